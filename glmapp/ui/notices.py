"""Pop-up notices (gr.Info, gr.Warning, gr.Error) whose text is shown as text.

Gradio renders these messages as HTML, and they quote adapter names, paths and errors from the file
system or the hub: a folder named `<img src=x onerror=...>` would become an (empty, sanitized) image.
Every pop-up of the handlers goes through here, so each is escaped once. A GlmappError is shown in the
reader's language (`lang`, from `i18n.lang_of(request)`): its code's translation (see i18n.error_text).
"""

from __future__ import annotations

import html

import gradio as gr

from glmapp.ui.i18n import ENGLISH, error_text


def as_text(message, lang: str = ENGLISH) -> str:
    """The message (an exception: in `lang`) with `&`, `<` and `>` escaped: the pop-up shows exactly these
    characters."""
    text = error_text(message, lang) if isinstance(message, BaseException) else str(message)
    return html.escape(text, quote=False)


def info(message, lang: str = ENGLISH) -> None:
    gr.Info(as_text(message, lang))


def warning(message, lang: str = ENGLISH) -> None:
    gr.Warning(as_text(message, lang))


def error(message, lang: str = ENGLISH) -> gr.Error:
    """An error to raise: `raise notices.error(...)`."""
    return gr.Error(as_text(message, lang))
