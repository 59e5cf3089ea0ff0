"""Pop-up notices (gr.Info, gr.Warning, gr.Error) whose text is shown as text.

Gradio renders these messages as HTML, and they quote adapter names, paths and errors from the file
system or the hub: a folder named `<img src=x onerror=...>` would become an (empty, sanitized) image.
Every pop-up of the handlers goes through here, so each is escaped once.
"""

from __future__ import annotations

import html

import gradio as gr


def as_text(message) -> str:
    """The message with `&`, `<` and `>` escaped: the pop-up shows exactly these characters."""
    return html.escape(str(message), quote=False)


def info(message) -> None:
    gr.Info(as_text(message))


def warning(message) -> None:
    gr.Warning(as_text(message))


def error(message) -> gr.Error:
    """An error to raise: `raise notices.error(...)`."""
    return gr.Error(as_text(message))
