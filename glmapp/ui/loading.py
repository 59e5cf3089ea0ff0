"""The page is up before the model is: a banner with the background load's progress (download bytes, speed and
time left, then the tensors read), the chat and compare controls closed until the model is served, and a failed
load shown in the page with how to fix it (`glmapp.host.ModelHost.start` loads; this only shows it).

Who opens what: the chat box is opened by the page's load event once the browser has its owner id and the model
is ready (conversations.page_load), else by the timer's first tick after the model is ready; the timer runs only
while a load is under way (page_load starts it), so a page opened after the load does no polling at all.
"""

from __future__ import annotations

import html

import gradio as gr

from glmapp.ui.i18n import ENGLISH, lang_of, t

# Opened when the model is ready (looked up by elem_id, so the panels need not pass them around).
GENERATION_CONTROLS = ("send-btn", "regenerate-btn", "compare-run", "arena-run")
POLL_S = 1.0


def load_state(backend):
    """The backend's LoadState while its first load is under way or failed, else None (ready)."""
    state = getattr(backend, "loading", None)
    return None if state is None or state.done else state


def ready(backend) -> bool:
    return load_state(backend) is None


def banner_html(backend, lang: str = ENGLISH) -> str:
    """The banner in `lang`; the load's own progress messages and errors stay in English (as in the log)."""
    state = load_state(backend)
    if state is None:
        return ""
    if state.error:
        return (f'<div class="load-failed" role="alert"><b>{html.escape(t("loading.failed", lang))}.</b> '
                f"{html.escape(state.error)}</div>")
    detail = f" · {html.escape(state.detail)}" if state.detail else ""
    percent = round(state.fraction * 100)
    return (f'<div class="load-running" role="status">'
            f'<b>{html.escape(t("loading.running", lang, name=backend.name))}</b> '
            f"— {html.escape(state.message)}: {percent}%{detail}"
            f'<progress max="100" value="{percent}" aria-label="loading progress"></progress>'
            f'<br><small>{html.escape(t("loading.hint", lang))}</small></div>')


def create_loading_banner(backend) -> dict:
    """The banner (shown while loading or after a failed load) and its polling timer (started by page_load)."""
    return {"banner": gr.HTML(banner_html(backend), elem_id="loading-banner", visible=not ready(backend)),
            "timer": gr.Timer(POLL_S, active=False)}


def find_controls(demo) -> list:
    found = {b.elem_id: b for b in demo.blocks.values() if getattr(b, "elem_id", None) in GENERATION_CONTROLS}
    missing = set(GENERATION_CONTROLS) - set(found)
    assert not missing, f"loading.py: no components with elem_id {sorted(missing)}"
    return [found[i] for i in GENERATION_CONTROLS]


def wire_loading(demo, backend, widgets: dict, textbox) -> None:
    """Each page load shows the load's state; the timer (while loading) updates it and opens the chat box and
    the generation buttons once the model is served, then stops."""
    controls = find_controls(demo)
    quick = dict(concurrency_limit=None, api_visibility="private", show_progress="hidden", queue=False)

    def show(request: gr.Request = None):
        is_ready = ready(backend)
        return (gr.update(value=banner_html(backend, lang_of(request)), visible=not is_ready),
                *(gr.update(interactive=is_ready) for _ in controls))

    def tick(request: gr.Request = None):
        state = load_state(backend)
        running = state is not None and not state.error
        return (*show(request), gr.update(interactive=True) if state is None else gr.skip(),
                gr.update(active=running))

    demo.load(show, None, [widgets["banner"], *controls], **quick)
    widgets["timer"].tick(tick, None, [widgets["banner"], *controls, textbox, widgets["timer"]], **quick)


def page_ready_updates(backend) -> tuple:
    """For the page's load event: (chat box update, timer update): the box opens now when the model is
    served, else the timer starts (unless the load already failed: then nothing will change)."""
    state = load_state(backend)
    if state is None:
        return gr.update(interactive=True), gr.skip()
    return gr.skip(), gr.update(active=not state.error)
