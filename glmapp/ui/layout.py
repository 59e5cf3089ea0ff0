"""The Gradio Blocks: one `create_*` function per panel builds its widgets and wires them to handlers.

No model code and no handler logic here: handlers live in *_handlers.py as plain functions.
"""

from __future__ import annotations

import functools
import tempfile

import gradio as gr

from glmapp.choices import DTYPES
from glmapp.store import open_store, sqlite_url
from glmapp.ui import model_handlers
from glmapp.ui.adapter_handlers import BASE, AdapterHandlers, dropdown_value, hub_downloads
from glmapp.ui.chat_handlers import ChatHandlers, ChatSettings, setting_ranges
from glmapp.ui.compare_handlers import (
    COLUMN_FIELDS,
    LABELS,
    MAX_COLUMNS,
    CompareHandlers,
)
from glmapp.ui.config import AppConfig
from glmapp.ui.conversations import (
    BROWSER_SECRET,
    BROWSER_STORAGE_KEY,
    REPLY_LINES_JS,
    SETTINGS,
    ConversationHandlers,
    reply_lines,
)
from glmapp.ui.i18n import (
    ENGLISH,
    I18N,
    LANGUAGE_CHOICES,
    LANGUAGES,
    PAGE_LOAD_JS,
    SWITCH_JS,
    CJK_FONT_CSS,
    lang_of,
    t,
    ui,
)
from glmapp.ui.export import conversation_record, write_html, write_json
from glmapp.ui.loading import create_loading_banner, wire_loading
from glmapp.ui.leaderboard import ARENA_VOTES, TIME_RANGES, ArenaHandlers, leaderboard
from glmapp.ui.render import LATEX_DELIMITERS
from glmapp.ui.server import ServerLimits
from glmapp.ui.sessions import ActiveRequests
from glmapp.ui.train_tab import create_train_tab, train_handlers, wire_train_results

CSS = """
#demo-banner { border: 2px solid #f0b429; background: #fff8e1; border-radius: 8px; padding: 4px 12px; }
#demo-banner * { color: #5c4400 !important; }
.stats-line { font-size: 0.85em; opacity: 0.8; min-height: 1.5em; }
.reply-meta { font-size: 0.75em; opacity: 0.7; margin: 2px 0 0 4px; }
#loading-banner .load-running { border: 2px solid #3b82f6; border-radius: 8px; padding: 6px 12px; }
#loading-banner .load-failed { border: 2px solid #dc2626; border-radius: 8px; padding: 6px 12px; }
#loading-banner progress { display: block; width: 100%; margin-top: 4px; }
""" + CJK_FONT_CSS


def build_ui(backend, config: AppConfig | None = None, limits: ServerLimits | None = None, store=None) -> gr.Blocks:
    """`store`: conversations and votes (launch opens the one the config names); None: a new SQLite file in a
    temporary folder, for tests and scripts that do not keep conversations."""
    config, limits = config or AppConfig(), limits or ServerLimits()
    store = store or open_store(sqlite_url(tempfile.mkdtemp(prefix="glmapp-store-")))
    active = ActiveRequests()
    chat = ChatHandlers(backend, active, config.max_new_tokens)
    conv = ConversationHandlers(store, chat, backend)
    compare = CompareHandlers(backend, config.comparisons_file, active, config.max_new_tokens)
    arena = ArenaHandlers(compare, store, backend)
    picker = AdapterHandlers(backend, hub_downloads(config))
    choices = picker.choices()
    with gr.Blocks(title="glmapp · ChatGLM chat", delete_cache=limits.cache_sweep) as demo:
        with gr.Row(equal_height=True):
            gr.Markdown(ui("app.heading"))
            # Language names are written in their own language; the choice is remembered in the browser.
            language = gr.Radio(LANGUAGE_CHOICES, value=ENGLISH, label=ui("app.language"), show_label=False,
                                container=False, elem_id="language-switch", scale=0, min_width=200)
        banner = gr.Markdown(model_handlers.demo_banner(backend), elem_id="demo-banner", visible=backend.demo)
        loading_widgets = create_loading_banner(backend)  # while the model loads in the background
        adapter = gr.State(None)  # this browser tab's LoRA adapter name; None = base model
        with gr.Tabs() as tabs:
            with gr.Tab(ui("tab.chat"), id="chat", elem_id="tab-chat") as chat_tab:
                chat_widgets = create_chat_tab(chat, backend, config, adapter, choices, conv)
            with gr.Tab(ui("tab.compare"), id="compare", elem_id="tab-compare") as compare_tab:
                compare_widgets = create_compare_tab(compare, backend, config, choices)
                arena_widgets = create_arena_panel(choices)
            with gr.Tab(ui("tab.leaderboard"), id="leaderboard", elem_id="tab-leaderboard") as board_tab:
                board_widgets = create_leaderboard_tab()
            with gr.Tab(ui("tab.model"), id="model", elem_id="tab-model") as model_tab:
                model_widgets = create_model_panel(backend, picker, adapter, choices)
            with gr.Tab(ui("tab.train"), id="train", elem_id="tab-train") as train_tab:
                train = train_handlers(backend, config)
                train_widgets = create_train_tab(train, language)
        wire_adapter_picker(demo, picker, adapter, model_widgets, chat_widgets, compare_widgets["adapters"])
        wire_train_results(tabs, train_widgets, train, picker.choices,
                           [model_widgets["adapter"], chat_widgets["adapter"], *compare_widgets["adapters"]],
                           compare_widgets)
        wire_conversations(demo, conv, chat_widgets["panel"], chat_widgets, adapter, model_widgets["adapter"],
                           loading_widgets["timer"])
        wire_loading(demo, backend, loading_widgets, chat_widgets["textbox"])
        wire_votes(arena, compare_widgets, arena_widgets, chat_widgets["panel"]["owner"], config)
        wire_leaderboard(store, board_tab, board_widgets)
        wire_language(demo, backend, language, banner, chat_widgets, board_widgets, picker, adapter,
                      [model_widgets["adapter"], chat_widgets["adapter"], *compare_widgets["adapters"]],
                      model_widgets, {"chat": chat_tab, "compare": compare_tab, "leaderboard": board_tab,
                                      "model": model_tab, "train": train_tab})
        demo.unload(chat.closed)
    # Gradio takes the translations at launch; whoever launches these Blocks gets them.
    demo.launch = functools.partial(demo.launch, i18n=I18N)
    return demo


def wire_language(demo, backend, language, banner, chat: dict, board: dict, picker: AdapterHandlers, adapter,
                  adapter_dropdowns: list, model: dict, tabs: dict) -> None:
    """The page's language: at load the browser's (or the remembered choice), then the switch. Gradio
    translates the layout in the browser; the text made here on the server (banner, example prompts, the
    leaderboard's ranges, the Model tab's info, the adapter choices and table) is sent again in the chosen
    language. The conversation is left as it is."""
    def show(lang, active):
        lang = lang if lang in LANGUAGES else ENGLISH
        choices = picker.choices(lang)
        return (lang, model_handlers.demo_banner(backend, lang), gr.update(examples=example_prompts(lang)),
                gr.update(choices=time_range_choices(lang)), picker.table(active, lang),
                model_handlers.model_info_markdown(backend, lang),
                model_handlers.capabilities_note(backend.capabilities(), lang), picker.status(active, lang),
                gr.update(choices=model_handlers.quant_choices(backend, lang)),  # also: a load since build_ui
                *(gr.update(choices=choices) for _ in adapter_dropdowns),
                # Gradio re-translates only the shown tab's name when the locale changes in place: all sent here.
                *(gr.update(label=t(f"tab.{name}", lang)) for name in tabs))

    outputs = [language, banner, chat["chatbot"], board["range"], model["adapter_table"], model["info"],
               model["capabilities"], model["adapter_status"], model["quant"], *adapter_dropdowns, *tabs.values()]
    quick = dict(concurrency_limit=None, api_visibility="private", show_progress="hidden")
    # First the browser (sets the switch, the cookie and Gradio's locale), then the server's text.
    demo.load(None, language, language, js=PAGE_LOAD_JS, **quick).then(show, [language, adapter], outputs, **quick)
    language.input(None, language, language, js=SWITCH_JS, **quick).then(show, [language, adapter], outputs, **quick)
    def use_example(choice: gr.SelectData):
        return choice.value["text"]

    chat["chatbot"].example_select(use_example, None, chat["textbox"], **quick)


def time_range_choices(lang: str) -> list[tuple[str, str]]:
    """The leaderboard's time ranges as (label in `lang`, the range's name), in TIME_RANGES order."""
    return [(t(f"board.range.{i}", lang), name) for i, name in enumerate(TIME_RANGES)]


def example_prompts(lang: str) -> list[dict]:
    """A few clickable starters for an empty chat, in the reader's language (a click puts one in the box)."""
    return [{"text": t(f"example.{i}", lang)} for i in range(1, 4)]


def wire_adapter_picker(demo, picker: AdapterHandlers, adapter: gr.State, model: dict, chat: dict,
                        compare_dropdowns: list) -> None:
    """The Model tab's picker and the Chat tab's compact dropdown set the same per-tab choice; the chat
    stats line says which one the next reply uses."""
    pickers = [model["adapter"], chat["adapter"]]
    everything = [adapter, *pickers, model["adapter_table"], model["adapter_status"], chat["stats"],
                  *compare_dropdowns]

    def show(before, active, status, lang):
        choices, value = picker.choices(lang), dropdown_value(active)
        changed = active != before
        return (active, *(gr.update(choices=choices, value=value) for _ in pickers), picker.table(active, lang),
                status, picker.next_reply(active, lang) if changed else gr.update(),
                *(gr.update(choices=choices) for _ in compare_dropdowns))

    def on_select(choice, active, request: gr.Request):
        lang = lang_of(request)
        return show(active, *picker.select(choice, active, lang), lang)

    def on_load(spec, active, request: gr.Request):
        lang = lang_of(request)
        return (*show(active, *picker.load_spec(spec, active, lang), lang), "")

    def on_refresh(active, request: gr.Request):
        lang = lang_of(request)
        return show(active, active, picker.status(active, lang), lang)

    quick = dict(concurrency_id="adapters", concurrency_limit=1, api_visibility="private", show_progress="minimal")
    for dropdown in pickers:
        # `.select` fires only on a person's pick; `.input` also fired when the other picker was updated.
        dropdown.select(on_select, [dropdown, adapter], everything, **quick)
    for trigger in (model["adapter_load"].click, model["adapter_spec"].submit):
        trigger(on_load, [model["adapter_spec"], adapter], [*everything, model["adapter_spec"]], **quick)
    model["adapter_refresh"].click(on_refresh, adapter, everything, **quick)

    def on_page_load(request: gr.Request):
        # Choices and the table only: the tab's choice is None at load, and writing it (or the dropdowns'
        # values) here would undo a pick made before this event's answer arrived.
        lang = lang_of(request)
        choices = picker.choices(lang)
        return (*(gr.update(choices=choices) for _ in pickers), picker.table(None, lang),
                *(gr.update(choices=choices) for _ in compare_dropdowns))

    demo.load(on_page_load, None, [*pickers, model["adapter_table"], *compare_dropdowns], concurrency_limit=None,
              api_visibility="private", show_progress="hidden")  # a new tab sees the adapters folder as it is now


def create_settings_panel(backend, config: AppConfig, adapter_choices: list) -> dict:
    d = ChatSettings.defaults(backend.family, backend.context_length, config.max_new_tokens)
    ranges = setting_ranges(backend.context_length, config.max_new_tokens)  # the handlers check the same table

    def slider(name: str, value, step, elem_id: str, **kw):
        r = ranges[name]
        return gr.Slider(r.minimum, r.maximum, value=value, step=step, label=ui(f"setting.{name}"), elem_id=elem_id, **kw)

    w = {}
    w["adapter"] = gr.Dropdown(adapter_choices, value=BASE, label=ui("settings.adapter"), elem_id="chat-adapter",
                               info=ui("settings.adapter_info"))
    w["system"] = gr.Textbox(label=ui("settings.system"), lines=2, elem_id="system-prompt",
                             placeholder=ui("settings.system_placeholder"),
                             visible=backend.family == "chatglm3")
    with gr.Accordion(ui("settings.generation"), open=True):
        w["max_length"] = slider("max_length", d.max_length, 1, "max-length", info=ui("settings.max_length_info"))
        w["max_new_tokens"] = slider("max_new_tokens", d.max_new_tokens, 1, "max-new-tokens")
        w["temperature"] = slider("temperature", d.temperature, 0.01, "temperature",
                                  info=ui("settings.temperature_info"))
        w["top_p"] = slider("top_p", d.top_p, 0.01, "top-p")
        w["top_k"] = slider("top_k", d.top_k, 1, "top-k", info=ui("settings.top_k_info"))
        w["repetition_penalty"] = slider("repetition_penalty", d.repetition_penalty, 0.01, "repetition-penalty")
        w["seed"] = gr.Number(value=-1, precision=0, label=ui("settings.seed"), elem_id="seed")
    return w


def create_conversation_list() -> dict:
    """The column beside the chat: New chat, search, the list (newest first), rename, delete with undo."""
    w = {"owner": gr.BrowserState(None, storage_key=BROWSER_STORAGE_KEY, secret=BROWSER_SECRET),
         "conversation": gr.State(None), "focus": gr.State(None), "deleted": gr.State(None)}
    w["new"] = gr.Button(ui("conv.new"), variant="primary", size="sm", elem_id="conv-new")
    w["search"] = gr.Textbox(show_label=False, placeholder=ui("conv.search"), elem_id="conv-search")
    w["list"] = gr.Radio([], label=ui("conv.list"), elem_id="conv-list")
    w["info"] = gr.Markdown("", elem_id="conv-info", elem_classes="stats-line")
    with gr.Row():
        w["title"] = gr.Textbox(show_label=False, placeholder=ui("conv.title"), scale=3, min_width=80, elem_id="conv-title")
        w["rename"] = gr.Button(ui("conv.rename"), size="sm", scale=1, min_width=60, elem_id="conv-rename")
    with gr.Row():
        w["delete"] = gr.Button(ui("conv.delete"), size="sm", variant="stop", elem_id="conv-delete")
        w["undo"] = gr.Button(ui("conv.undo"), size="sm", visible=False, elem_id="conv-undo")
    with gr.Row():
        w["export"] = gr.Button(ui("conv.export"), size="sm", elem_id="conv-export")
        w["export_all"] = gr.Button(ui("conv.export_all"), size="sm", elem_id="conv-export-all")
        w["import"] = gr.UploadButton(ui("conv.import"), size="sm", file_types=[".json"], elem_id="conv-import")
    w["file"] = gr.File(label=ui("common.download"), interactive=False, visible=False, elem_id="conv-export-file")
    return w


def wire_conversations(demo, conv: ConversationHandlers, w: dict, chat: dict, adapter: gr.State,
                       model_picker, loading_timer) -> None:
    """The list's events; the chat's own events are wired in create_chat_tab with the same states. Opening a
    conversation sets the tab's adapter in both pickers (Chat tab and Model tab)."""
    quick = dict(concurrency_limit=None, api_visibility="private", show_progress="hidden")
    owner, conversation, query = w["owner"], w["conversation"], w["search"]
    # Not queued: through the queue, on a Space start (ZeroGPU mode) under load, its answer never reached the page
    # and the chat box stayed closed (reproduced 3 of 3 beside a CPU hog; 0 of 3 unqueued).
    demo.load(conv.page_load, [owner, query], [owner, w["list"], chat["textbox"], loading_timer], queue=False,
              **quick)
    query.change(conv.search, [query, conversation, owner], w["list"], **quick)
    fresh = [chat["chatbot"], chat["messages"], chat["textbox"], chat["stats"], conversation, w["title"], w["info"],
             chat["bar"], w["focus"], w["list"]]
    for trigger in (w["new"].click, chat["clear"].click, chat["chatbot"].clear):  # Clear starts a new chat too
        trigger(conv.new_chat, None, fresh, **quick)
    opened = [chat["chatbot"], chat["messages"], conversation, w["title"], w["info"], chat["bar"], w["focus"],
              chat["stats"], adapter, chat["adapter"], model_picker, *(chat[k] for k in SETTINGS)]
    w["list"].input(conv.open, [w["list"], owner], opened, **quick)
    w["rename"].click(conv.rename, [conversation, w["title"], query, owner], w["list"], **quick)
    w["title"].submit(conv.rename, [conversation, w["title"], query, owner], w["list"], **quick)
    w["delete"].click(conv.delete, [conversation, query, owner], [*fresh[:-1], w["list"], w["deleted"], w["undo"]],
                      **quick)
    w["undo"].click(conv.undo_delete, [w["deleted"], query, owner], [w["list"], w["deleted"], w["undo"]], **quick)
    chat["chatbot"].select(conv.focus, [conversation, owner], [chat["bar"], w["focus"]], **quick)
    lines = gr.JSON(visible=False)  # each reply's adapter, tokens and tokens/s, shown under it by REPLY_LINES_JS
    chat["chatbot"].change(reply_lines, chat["messages"], lines, trigger_mode="always_last", **quick).then(
        None, lines, None, js=REPLY_LINES_JS, **quick)
    w["export"].click(conv.export_one, [conversation, owner], w["file"], **quick)
    w["export_all"].click(conv.export_every, owner, w["file"], **quick)
    w["import"].upload(conv.import_file, [w["import"], query, owner], w["list"], **quick)
    for button, handler in ((chat["older"], conv.older), (chat["newer"], conv.newer)):
        button.click(handler, [conversation, w["focus"], owner],
                     [chat["chatbot"], chat["messages"], chat["bar"], w["focus"]], **quick)


def create_chat_tab(chat: ChatHandlers, backend, config: AppConfig, adapter: gr.State, adapter_choices: list,
                    conv: ConversationHandlers) -> dict:
    with gr.Row():
        with gr.Column(scale=1, min_width=220, elem_id="conversation-panel"):
            panel = create_conversation_list()
        with gr.Column(scale=4):
            chatbot = gr.Chatbot(elem_id="chatbot", label=ui("chat.label"), height=480, editable="user",
                                 latex_delimiters=LATEX_DELIMITERS, sanitize_html=True, render_markdown=True,
                                 buttons=["copy", "copy_all"], feedback_options=None, allow_tags=False,
                                 examples=example_prompts(ENGLISH))  # the page's language replaces them at load
            # Disabled until the page's load event has given this browser its owner id (conv.page_load).
            textbox = gr.Textbox(show_label=False, lines=1, max_lines=8, elem_id="chat-input", autofocus=True,
                                 interactive=False,
                                 placeholder=ui("chat.placeholder"))
            with gr.Row():
                send = gr.Button(ui("chat.send"), variant="primary", elem_id="send-btn")
                stop = gr.Button(ui("chat.stop"), variant="stop", elem_id="stop-btn")
                regenerate = gr.Button(ui("chat.regenerate"), elem_id="regenerate-btn")
                undo = gr.Button(ui("chat.undo"), elem_id="undo-btn")
                clear = gr.Button(ui("chat.clear"), elem_id="clear-btn")
            stats = gr.Markdown("", elem_id="chat-stats", elem_classes="stats-line")
            with gr.Row(equal_height=True):  # the clicked message's (default: the last changed one's) versions
                older = gr.Button(ui("chat.older"), size="sm", scale=0, min_width=60, elem_id="version-older")
                bar = gr.Markdown("", elem_id="versions-bar", elem_classes="stats-line")
                newer = gr.Button(ui("chat.newer"), size="sm", scale=0, min_width=60, elem_id="version-newer")
            with gr.Row():
                export_json = gr.Button(ui("chat.export_json"), size="sm", elem_id="export-json-btn")
                export_html = gr.Button(ui("chat.export_html"), size="sm", elem_id="export-html-btn")
            # Shown once there is something to download (an empty upload box reads as an invitation to drop files).
            export_file = gr.File(label=ui("common.download"), elem_id="export-file", interactive=False, visible=False)
        with gr.Column(scale=2):
            settings = create_settings_panel(backend, config, adapter_choices)
    messages = gr.State([])
    setting_inputs = [settings[k] for k in ("system", "max_length", "max_new_tokens", "temperature", "top_p",
                                            "top_k", "repetition_penalty", "seed")]
    outputs = [chatbot, messages, textbox, stats]
    # The conversation handlers wrap the chat's: the same inputs plus the conversation and owner; replies also
    # update the versions bar and the list once stored.
    keep = [panel["conversation"], panel["owner"]]
    saved = [*outputs, bar, panel["focus"], panel["list"]]
    # Raw values reach the handlers (preprocess=False), which check them and name a bad one; the quick
    # `accept` step moves the message out of the box, then `reply` streams without writing the box.
    generate = dict(concurrency_id="generate", concurrency_limit=config.max_concurrency, show_progress="hidden",
                    preprocess=False, api_visibility="private")
    # ZeroGPU: the backend runs each generation in a GPU call of its own (glmapp.ui.zero_gpu.zero_gpu_backend).
    reply, regenerate_reply, edit_reply = conv.reply, conv.regenerate, conv.edit
    for trigger in (textbox.submit, send.click):
        # "multiple": the default ("once") silently drops an Enter while an earlier one is pending.
        trigger(conv.accept, [textbox, messages, *setting_inputs, adapter, *keep],
                [chatbot, messages, textbox, panel["conversation"], panel["list"]],
                concurrency_limit=None, show_progress="hidden", preprocess=False, api_visibility="private",
                trigger_mode="multiple").success(reply, [messages, *setting_inputs, adapter, *keep], saved, **generate)
    gr.api(chat.api_chat, api_name="chat", concurrency_id="generate",
           concurrency_limit=config.max_concurrency)
    regenerate.click(regenerate_reply, [messages, *setting_inputs, adapter, *keep], saved, **generate)
    chatbot.edit(edit_reply, [messages, *setting_inputs, adapter, *keep], saved, **generate)
    stop.click(chat.stop, None, None, concurrency_limit=None, api_visibility="private", show_progress="hidden")
    undo.click(chat.undo, [messages], [chatbot, messages, textbox], concurrency_limit=None,
               api_visibility="private")

    def export(kind: str):
        # Named parameters: Gradio passes `request` only to a named parameter, never after *args.
        def handler(history, system, max_length, max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed,
                    adapter, request: gr.Request = None):
            values = dict(max_length=max_length, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                          top_k=top_k, repetition_penalty=repetition_penalty, seed=seed, adapter=adapter)
            record = conversation_record(history, system or "", vars(backend.info()), values)
            path = (write_json(record, "conversation") if kind == "json"
                    else write_html(record, lang=lang_of(request)))  # the page's chrome in the reader's language
            return gr.File(path, visible=True)
        return handler

    export_json.click(export("json"), [messages, *setting_inputs, adapter], export_file, concurrency_limit=None,
                      api_visibility="private")
    export_html.click(export("html"), [messages, *setting_inputs, adapter], export_file, concurrency_limit=None,
                      api_visibility="private")
    return dict(chatbot=chatbot, textbox=textbox, messages=messages, stats=stats, bar=bar, older=older, newer=newer,
                clear=clear, panel=panel, **settings)


def create_compare_tab(compare: CompareHandlers, backend, config: AppConfig, adapter_choices: list) -> dict:
    d = ChatSettings.defaults(backend.family, backend.context_length, config.max_new_tokens)
    ranges = setting_ranges(backend.context_length, config.max_new_tokens)
    gr.Markdown(ui("compare.intro"))
    with gr.Row():
        prompt = gr.Textbox(label=ui("compare.prompt"), lines=2, max_lines=8, scale=4, elem_id="compare-prompt",
                            placeholder=ui("compare.placeholder"))
        with gr.Column(scale=1):
            n_columns = gr.Radio([2, 3, 4], value=2, label=ui("compare.columns"), elem_id="compare-n")
            r = ranges["max_new_tokens"]
            max_new_tokens = gr.Slider(r.minimum, r.maximum, value=min(256, r.maximum), step=1,
                                       label=ui("setting.max_new_tokens"),
                                       elem_id="compare-max-new-tokens")
    run = gr.Button(ui("compare.run"), variant="primary", elem_id="compare-run")
    columns, column_inputs, outputs, stats, adapters = [], [], [], [], []
    with gr.Row(equal_height=False):
        for i, label in enumerate(LABELS[:MAX_COLUMNS]):
            with gr.Column(visible=i < 2, min_width=220) as col:
                gr.Markdown(f"### {label}")
                adapters.append(gr.Dropdown(adapter_choices, value=BASE, label=ui("compare.adapter"), show_label=False,
                                            elem_id=f"compare-adapter-{label}"))
                with gr.Accordion(f"{label} " + ui("compare.settings"), open=False):
                    column_inputs += [
                        adapters[-1],
                        gr.Slider(ranges["temperature"].minimum, ranges["temperature"].maximum, value=d.temperature,
                                  step=0.01, label=ui("setting.temperature"), elem_id=f"compare-temperature-{label}"),
                        gr.Slider(ranges["top_p"].minimum, ranges["top_p"].maximum, value=d.top_p, step=0.01,
                                  label=ui("setting.top_p"), elem_id=f"compare-top-p-{label}"),
                        gr.Number(value=i + 1, precision=0, label=ui("settings.seed"),
                                  elem_id=f"compare-seed-{label}"),
                    ]
                stats.append(gr.Markdown("", elem_id=f"compare-stats-{label}", elem_classes="stats-line"))
                outputs.append(gr.Markdown("", elem_id=f"compare-out-{label}", sanitize_html=True,
                                           latex_delimiters=LATEX_DELIMITERS, container=True, min_height=120))
            columns.append(col)
    record = gr.State(None)
    with gr.Row():
        vote_buttons = {c: gr.Button(ui(f"vote.{c}"), elem_id=f"vote-{c}", visible=c in ("A", "B", "tie", "both_bad"))
                        for c in ("A", "B", "C", "D", "tie", "both_bad")}
    note = gr.Textbox(label=ui("compare.note"), elem_id="compare-note")
    vote_status = gr.Markdown("", elem_id="vote-status")
    with gr.Row():
        export = gr.Button(ui("compare.export"), size="sm", elem_id="compare-export-btn")
        export_file = gr.File(label=ui("common.download"), elem_id="compare-export-file", interactive=False,
                              visible=False)  # shown once a comparison was exported

    def show_columns(n):
        n = int(n)
        return ([gr.update(visible=i < n) for i in range(MAX_COLUMNS)]
                + [gr.update(visible=c == "tie" or LABELS.index(c) < n) for c in ("A", "B", "C", "D")])

    n_columns.change(show_columns, n_columns, [*columns, *(vote_buttons[c] for c in "ABCD")],
                     api_visibility="private")
    run_event = dict(fn=compare.run, inputs=[prompt, n_columns, max_new_tokens, *column_inputs],
                     outputs=[*outputs, *stats, record], concurrency_id="generate",
                     concurrency_limit=config.max_concurrency, show_progress="hidden",
                     preprocess=False)  # raw values: the handler checks them and names a bad one
    run.click(api_name="compare", **run_event)
    prompt.submit(api_visibility="private", **run_event)
    export.click(lambda r: gr.File(compare.export(r), visible=True), record, export_file, concurrency_limit=None,
                 api_visibility="private")
    assert len(column_inputs) == MAX_COLUMNS * len(COLUMN_FIELDS)
    return dict(prompt=prompt, n_columns=n_columns, outputs=outputs, stats=stats, record=record, adapters=adapters,
                max_new_tokens=max_new_tokens, vote_buttons=vote_buttons, note=note, vote_status=vote_status)


def create_arena_panel(adapter_choices: list) -> dict:
    """Anonymous A/B under the Compare tab's prompt: two entries drawn from those ticked, names shown after the vote."""
    gr.Markdown(ui("arena.intro"))
    w = {"state": gr.State(None)}
    w["pool"] = gr.CheckboxGroup(adapter_choices, label=ui("arena.pool"), elem_id="arena-pool",
                                 value=[v for label, v in adapter_choices if not label.endswith("(unavailable)")])
    w["run"] = gr.Button(ui("arena.run"), variant="primary", elem_id="arena-run")
    with gr.Row(equal_height=False):
        for label in "AB":
            with gr.Column(min_width=220):
                gr.Markdown(f"### {label}")
                w[f"stats-{label}"] = gr.Markdown("", elem_id=f"arena-stats-{label}", elem_classes="stats-line")
                w[f"out-{label}"] = gr.Markdown("", elem_id=f"arena-out-{label}", sanitize_html=True,
                                                latex_delimiters=LATEX_DELIMITERS, container=True, min_height=120)
    with gr.Row():
        w["votes"] = {c: gr.Button(ui(f"vote.{c}"), elem_id=f"arena-vote-{c}") for c in ARENA_VOTES}
        w["reveal"] = gr.Button(ui("arena.reveal"), elem_id="arena-reveal")
    w["note"] = gr.Textbox(label=ui("compare.note"), elem_id="arena-note")
    w["status"] = gr.Markdown("", elem_id="arena-status")
    return w


def wire_votes(arena: ArenaHandlers, compare: dict, w: dict, owner, config: AppConfig) -> None:
    """Compare and arena votes go to comparisons.jsonl and to the store, with the browser's or user's owner id."""
    quick = dict(concurrency_limit=None, api_visibility="private")

    def compare_vote(choice):
        def handler(note, record, browser_id, request: gr.Request):
            return arena.compare_vote(choice, note, record, browser_id, request)
        return handler

    for choice, button in compare["vote_buttons"].items():
        button.click(compare_vote(choice), [compare["note"], compare["record"], owner], compare["vote_status"], **quick)
    shown = [w["out-A"], w["out-B"], w["stats-A"], w["stats-B"], w["state"], w["status"]]
    w["run"].click(arena.run, [compare["prompt"], compare["max_new_tokens"], w["pool"]], shown,
                   concurrency_id="generate", concurrency_limit=config.max_concurrency, show_progress="hidden",
                   preprocess=False, api_visibility="private")

    def arena_vote(choice):
        def handler(note, state, browser_id, request: gr.Request):
            return arena.vote(choice, note, state, browser_id, request)
        return handler

    for choice, button in w["votes"].items():
        button.click(arena_vote(choice), [w["note"], w["state"], owner], [w["state"], w["status"]], **quick)
    w["reveal"].click(arena.reveal, w["state"], [w["state"], w["status"]], **quick)


def create_leaderboard_tab() -> dict:
    gr.Markdown(ui("board.intro"))
    w = {}
    with gr.Row():
        w["range"] = gr.Radio(time_range_choices(ENGLISH), value=next(iter(TIME_RANGES)), label=ui("board.range"),
                              elem_id="board-range")  # choice labels: in the page's language once it loads
        w["anonymous"] = gr.Checkbox(False, label=ui("board.anonymous"), elem_id="board-anonymous")
        w["refresh"] = gr.Button(ui("board.refresh"), size="sm", elem_id="board-refresh")
    w["table"] = gr.Markdown("", elem_id="board-table")
    gr.Markdown(ui("board.heat"))
    w["heat"] = gr.HTML("", elem_id="board-heat")
    w["notes"] = gr.Markdown("", elem_id="board-notes")
    return w


def wire_leaderboard(store, tab, w: dict) -> None:
    def show(time_range, anonymous_only, request: gr.Request):
        return leaderboard(store.votes, time_range, anonymous_only, lang=lang_of(request))

    for trigger in (tab.select, w["refresh"].click, w["range"].input, w["anonymous"].input):
        trigger(show, [w["range"], w["anonymous"]], [w["table"], w["heat"], w["notes"]], concurrency_id="leaderboard",
                concurrency_limit=2, api_visibility="private")


def create_model_panel(backend, picker: AdapterHandlers, adapter: gr.State, adapter_choices: list) -> dict:
    w, caps = {}, backend.capabilities()
    with gr.Row():
        with gr.Column(scale=3):
            w["info"] = gr.Markdown(model_handlers.model_info_markdown(backend), elem_id="model-info")  # + at load
            w["capabilities"] = gr.Markdown(model_handlers.capabilities_note(caps), elem_id="capabilities-note",
                        visible=bool(caps.unavailable()))
            gr.Markdown(ui("model.adapters_local") + f" (`{backend.adapters_dir}/`)" if caps.adapter_loading is None
                        else ui("model.adapters_remote"))
            w["adapter_table"] = gr.Markdown(picker.table(None), elem_id="adapter-table")
        with gr.Column(scale=2, elem_id="model-options"):
            gr.Markdown(ui("model.lora"))
            w["adapter"] = gr.Dropdown(adapter_choices, value=BASE, label=ui("model.adapter"),
                                       elem_id="adapter-choice",
                                       info=ui("model.adapter_info"))
            w["adapter_status"] = gr.Markdown(picker.status(None), elem_id="adapter-status")
            with gr.Row():
                w["adapter_spec"] = gr.Textbox(show_label=False, scale=3, elem_id="adapter-spec",
                                               placeholder=ui("model.adapter_spec") if caps.adapter_loading is None else
                                               caps.adapter_loading, interactive=caps.adapter_loading is None)
                w["adapter_load"] = gr.Button(ui("model.load"), scale=1, min_width=60, elem_id="adapter-load-btn",
                                              interactive=caps.adapter_loading is None)
            w["adapter_refresh"] = gr.Button(ui("model.refresh_adapters"), size="sm", elem_id="adapter-refresh-btn")
            gr.Markdown(ui("model.quant_heading"))
            with gr.Row():
                w["quant"] = gr.Dropdown(model_handlers.quant_choices(backend),
                                         value=model_handlers.current_quant(backend)
                                         if caps.quantization is None else None,
                                         label=ui("model.quant"), elem_id="quant-choice", scale=3,
                                         interactive=caps.quantization is None,
                                         info=caps.quantization or ui("model.quant_info"))
                quantize = gr.Button(ui("model.quant_reload"), scale=1, min_width=80, elem_id="quant-reload-btn",
                                     interactive=caps.quantization is None)
            w["dtype"] = gr.Radio(list(DTYPES), value=backend.dtype_choice,
                                  label=ui("model.dtype"), elem_id="dtype-choice",
                                  interactive=caps.dtype_switch is None,
                                  info=caps.dtype_switch or ui("model.dtype_info"))
            reload = gr.Button(ui("model.reload"), variant="primary", elem_id="reload-btn",
                               interactive=caps.dtype_switch is None)
            refresh = gr.Button(ui("model.refresh"), size="sm", elem_id="refresh-info-btn")

    def do_reload(choice, active, request: gr.Request, progress=gr.Progress()):
        lang = lang_of(request)
        return model_handlers.reload_model(backend, choice, progress, lang), picker.table(active, lang)

    reload.click(do_reload, [w["dtype"], adapter], [w["info"], w["adapter_table"]], concurrency_id="reload",
                 concurrency_limit=1, api_visibility="private")

    def do_quantize(mode, active, request: gr.Request, progress=gr.Progress()):
        lang = lang_of(request)
        return model_handlers.switch_quantization(backend, mode, progress, lang), picker.table(active, lang)

    quantize.click(do_quantize, [w["quant"], adapter], [w["info"], w["adapter_table"]], concurrency_id="reload",
                   concurrency_limit=1, api_visibility="private")
    def do_refresh(request: gr.Request):
        return model_handlers.model_info_markdown(backend, lang_of(request))

    refresh.click(do_refresh, None, w["info"], concurrency_limit=None,
                  api_visibility="private")
    return w
