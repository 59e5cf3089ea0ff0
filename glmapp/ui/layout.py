"""The Gradio Blocks: one `create_*` function per panel builds its widgets and wires them to handlers.

No model code and no handler logic here: handlers live in *_handlers.py as plain functions.
"""

from __future__ import annotations

import tempfile

import gradio as gr

from glmapp.choices import DTYPES
from glmapp.store import open_store, sqlite_url
from glmapp.ui import model_handlers
from glmapp.ui.zero_gpu import gpu_for
from glmapp.ui.adapter_handlers import BASE, AdapterHandlers, dropdown_value, hub_downloads
from glmapp.ui.chat_handlers import ChatHandlers, ChatSettings, setting_ranges
from glmapp.ui.compare_handlers import (
    COLUMN_FIELDS,
    LABELS,
    MAX_COLUMNS,
    VOTES,
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
from glmapp.ui.export import conversation_record, write_html, write_json
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
"""


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
        gr.Markdown("## glmapp · chat with ChatGLM on your machine")
        gr.Markdown(model_handlers.demo_banner(backend), elem_id="demo-banner", visible=backend.demo)
        adapter = gr.State(None)  # this browser tab's LoRA adapter name; None = base model
        with gr.Tabs() as tabs:
            with gr.Tab("Chat", id="chat", elem_id="tab-chat"):
                chat_widgets = create_chat_tab(chat, backend, config, adapter, choices, conv)
            with gr.Tab("Compare", id="compare", elem_id="tab-compare"):
                compare_widgets = create_compare_tab(compare, backend, config, choices)
                arena_widgets = create_arena_panel(choices)
            with gr.Tab("Leaderboard", id="leaderboard", elem_id="tab-leaderboard") as board_tab:
                board_widgets = create_leaderboard_tab()
            with gr.Tab("Model", id="model", elem_id="tab-model"):
                model_widgets = create_model_panel(backend, picker, adapter, choices)
            with gr.Tab("Train", id="train", elem_id="tab-train"):
                train = train_handlers(backend, config)
                train_widgets = create_train_tab(train)
        wire_adapter_picker(demo, picker, adapter, model_widgets, chat_widgets, compare_widgets["adapters"])
        wire_train_results(tabs, train_widgets, train, picker.choices,
                           [model_widgets["adapter"], chat_widgets["adapter"], *compare_widgets["adapters"]],
                           compare_widgets)
        wire_conversations(demo, conv, chat_widgets["panel"], chat_widgets, adapter, model_widgets["adapter"])
        wire_votes(arena, compare_widgets, arena_widgets, chat_widgets["panel"]["owner"], config)
        wire_leaderboard(store, board_tab, board_widgets)
        demo.unload(chat.closed)
    return demo


def wire_adapter_picker(demo, picker: AdapterHandlers, adapter: gr.State, model: dict, chat: dict,
                        compare_dropdowns: list) -> None:
    """The Model tab's picker and the Chat tab's compact dropdown set the same per-tab choice; the chat
    stats line says which one the next reply uses."""
    pickers = [model["adapter"], chat["adapter"]]
    everything = [adapter, *pickers, model["adapter_table"], model["adapter_status"], chat["stats"],
                  *compare_dropdowns]

    def show(before, active, status):
        choices, value = picker.choices(), dropdown_value(active)
        changed = active != before
        return (active, *(gr.update(choices=choices, value=value) for _ in pickers), picker.table(active), status,
                picker.next_reply(active) if changed else gr.update(),
                *(gr.update(choices=choices) for _ in compare_dropdowns))

    def on_select(choice, active):
        return show(active, *picker.select(choice, active))

    def on_load(spec, active):
        return (*show(active, *picker.load_spec(spec, active)), "")

    def on_refresh(active):
        return show(active, active, picker.status(active))

    quick = dict(concurrency_id="adapters", concurrency_limit=1, api_visibility="private", show_progress="minimal")
    for dropdown in pickers:
        # `.select` fires only on a person's pick; `.input` also fired when the other picker was updated.
        dropdown.select(on_select, [dropdown, adapter], everything, **quick)
    for trigger in (model["adapter_load"].click, model["adapter_spec"].submit):
        trigger(on_load, [model["adapter_spec"], adapter], [*everything, model["adapter_spec"]], **quick)
    model["adapter_refresh"].click(on_refresh, adapter, everything, **quick)

    def on_page_load():
        # Choices and the table only: the tab's choice is None at load, and writing it (or the dropdowns'
        # values) here would undo a pick made before this event's answer arrived.
        choices = picker.choices()
        return (*(gr.update(choices=choices) for _ in pickers), picker.table(None),
                *(gr.update(choices=choices) for _ in compare_dropdowns))

    demo.load(on_page_load, None, [*pickers, model["adapter_table"], *compare_dropdowns], concurrency_limit=None,
              api_visibility="private", show_progress="hidden")  # a new tab sees the adapters folder as it is now


def create_settings_panel(backend, config: AppConfig, adapter_choices: list) -> dict:
    d = ChatSettings.defaults(backend.family, backend.context_length, config.max_new_tokens)
    ranges = setting_ranges(backend.context_length, config.max_new_tokens)  # the handlers check the same table

    def slider(name: str, value, step, elem_id: str, **kw):
        r = ranges[name]
        return gr.Slider(r.minimum, r.maximum, value=value, step=step, label=r.label, elem_id=elem_id, **kw)

    w = {}
    w["adapter"] = gr.Dropdown(adapter_choices, value=BASE, label="LoRA adapter", elem_id="chat-adapter",
                               info="applies to this tab's next reply; details in the Model tab")
    w["system"] = gr.Textbox(label="System prompt (ChatGLM3)", lines=2, elem_id="system-prompt",
                             placeholder="e.g. You are a helpful assistant.",
                             visible=backend.family == "chatglm3")
    with gr.Accordion("Generation settings", open=True):
        w["max_length"] = slider("max_length", d.max_length, 1, "max-length", info="prompt + reply, in tokens")
        w["max_new_tokens"] = slider("max_new_tokens", d.max_new_tokens, 1, "max-new-tokens")
        w["temperature"] = slider("temperature", d.temperature, 0.01, "temperature",
                                  info="0 = greedy (always the same reply)")
        w["top_p"] = slider("top_p", d.top_p, 0.01, "top-p")
        w["top_k"] = slider("top_k", d.top_k, 1, "top-k", info="0 = off")
        w["repetition_penalty"] = slider("repetition_penalty", d.repetition_penalty, 0.01, "repetition-penalty")
        w["seed"] = gr.Number(value=-1, precision=0, label="Seed (-1 = random)", elem_id="seed")
    return w


def create_conversation_list() -> dict:
    """The column beside the chat: New chat, search, the list (newest first), rename, delete with undo."""
    w = {"owner": gr.BrowserState(None, storage_key=BROWSER_STORAGE_KEY, secret=BROWSER_SECRET),
         "conversation": gr.State(None), "focus": gr.State(None), "deleted": gr.State(None)}
    w["new"] = gr.Button("New chat", variant="primary", size="sm", elem_id="conv-new")
    w["search"] = gr.Textbox(show_label=False, placeholder="Search titles and messages", elem_id="conv-search")
    w["list"] = gr.Radio([], label="Conversations", elem_id="conv-list")
    w["info"] = gr.Markdown("", elem_id="conv-info", elem_classes="stats-line")
    with gr.Row():
        w["title"] = gr.Textbox(show_label=False, placeholder="Title", scale=3, min_width=80, elem_id="conv-title")
        w["rename"] = gr.Button("Rename", size="sm", scale=1, min_width=60, elem_id="conv-rename")
    with gr.Row():
        w["delete"] = gr.Button("Delete", size="sm", variant="stop", elem_id="conv-delete")
        w["undo"] = gr.Button("Undo delete", size="sm", visible=False, elem_id="conv-undo")
    with gr.Row():
        w["export"] = gr.Button("Export", size="sm", elem_id="conv-export")
        w["export_all"] = gr.Button("Export all", size="sm", elem_id="conv-export-all")
        w["import"] = gr.UploadButton("Import", size="sm", file_types=[".json"], elem_id="conv-import")
    w["file"] = gr.File(label="Download", interactive=False, visible=False, elem_id="conv-export-file")
    return w


def wire_conversations(demo, conv: ConversationHandlers, w: dict, chat: dict, adapter: gr.State,
                       model_picker) -> None:
    """The list's events; the chat's own events are wired in create_chat_tab with the same states. Opening a
    conversation sets the tab's adapter in both pickers (Chat tab and Model tab)."""
    quick = dict(concurrency_limit=None, api_visibility="private", show_progress="hidden")
    owner, conversation, query = w["owner"], w["conversation"], w["search"]
    demo.load(conv.page_load, [owner, query], [owner, w["list"], chat["textbox"]], **quick)
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
            chatbot = gr.Chatbot(elem_id="chatbot", label="Chat", height=480, editable="user",
                                 latex_delimiters=LATEX_DELIMITERS, sanitize_html=True, render_markdown=True,
                                 buttons=["copy", "copy_all"], feedback_options=None, allow_tags=False)
            # Disabled until the page's load event has given this browser its owner id (conv.page_load).
            textbox = gr.Textbox(show_label=False, lines=1, max_lines=8, elem_id="chat-input", autofocus=True,
                                 interactive=False,
                                 placeholder="Type a message · Enter sends · Shift+Enter adds a line")
            with gr.Row():
                send = gr.Button("Send", variant="primary", elem_id="send-btn")
                stop = gr.Button("Stop", variant="stop", elem_id="stop-btn")
                regenerate = gr.Button("Regenerate", elem_id="regenerate-btn")
                undo = gr.Button("Undo", elem_id="undo-btn")
                clear = gr.Button("Clear", elem_id="clear-btn")
            stats = gr.Markdown("", elem_id="chat-stats", elem_classes="stats-line")
            with gr.Row(equal_height=True):  # the clicked message's (default: the last changed one's) versions
                older = gr.Button("‹ older version", size="sm", scale=0, min_width=60, elem_id="version-older")
                bar = gr.Markdown("", elem_id="versions-bar", elem_classes="stats-line")
                newer = gr.Button("newer version ›", size="sm", scale=0, min_width=60, elem_id="version-newer")
            with gr.Row():
                export_json = gr.Button("Export JSON", size="sm", elem_id="export-json-btn")
                export_html = gr.Button("Export HTML", size="sm", elem_id="export-html-btn")
            # Shown once there is something to download (an empty upload box reads as an invitation to drop files).
            export_file = gr.File(label="Download", elem_id="export-file", interactive=False, visible=False)
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
    on_gpu = gpu_for(backend, 3)  # ZeroGPU: each call asks for the GPU time its max new tokens (argument 3) need
    reply, regenerate_reply, edit_reply = on_gpu(conv.reply), on_gpu(conv.regenerate), on_gpu(conv.edit)
    for trigger in (textbox.submit, send.click):
        # "multiple": the default ("once") silently drops an Enter while an earlier one is pending.
        trigger(conv.accept, [textbox, messages, *setting_inputs, adapter, *keep],
                [chatbot, messages, textbox, panel["conversation"], panel["list"]],
                concurrency_limit=None, show_progress="hidden", preprocess=False, api_visibility="private",
                trigger_mode="multiple").success(reply, [messages, *setting_inputs, adapter, *keep], saved, **generate)
    gr.api(on_gpu(chat.api_chat), api_name="chat", concurrency_id="generate",
           concurrency_limit=config.max_concurrency)
    regenerate.click(regenerate_reply, [messages, *setting_inputs, adapter, *keep], saved, **generate)
    chatbot.edit(edit_reply, [messages, *setting_inputs, adapter, *keep], saved, **generate)
    stop.click(chat.stop, None, None, concurrency_limit=None, api_visibility="private", show_progress="hidden")
    undo.click(chat.undo, [messages], [chatbot, messages, textbox], concurrency_limit=None,
               api_visibility="private")

    def export(kind: str):
        def handler(history, system, *values):
            record = conversation_record(history, system or "", vars(backend.info()),
                                         dict(zip(["max_length", "max_new_tokens", "temperature", "top_p",
                                                   "top_k", "repetition_penalty", "seed", "adapter"], values)))
            path = write_json(record, "conversation") if kind == "json" else write_html(record)
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
    gr.Markdown("One prompt, several columns, each with its own LoRA adapter (or the base model) and sampling "
                "settings. All columns are submitted together and the engine decodes them **as one batched generation**, so they stream at the "
                "same time; each column shows its own tokens/s.")
    with gr.Row():
        prompt = gr.Textbox(label="Prompt", lines=2, max_lines=8, scale=4, elem_id="compare-prompt",
                            placeholder="Type a prompt · Enter runs all columns · Shift+Enter adds a line")
        with gr.Column(scale=1):
            n_columns = gr.Radio([2, 3, 4], value=2, label="Columns", elem_id="compare-n")
            r = ranges["max_new_tokens"]
            max_new_tokens = gr.Slider(r.minimum, r.maximum, value=min(256, r.maximum), step=1, label=r.label,
                                       elem_id="compare-max-new-tokens")
    run = gr.Button("Run all columns", variant="primary", elem_id="compare-run")
    columns, column_inputs, outputs, stats, adapters = [], [], [], [], []
    with gr.Row(equal_height=False):
        for i, label in enumerate(LABELS[:MAX_COLUMNS]):
            with gr.Column(visible=i < 2, min_width=220) as col:
                gr.Markdown(f"### {label}")
                adapters.append(gr.Dropdown(adapter_choices, value=BASE, label="Adapter", show_label=False,
                                            elem_id=f"compare-adapter-{label}"))
                with gr.Accordion(f"{label} settings", open=False):
                    column_inputs += [
                        adapters[-1],
                        gr.Slider(ranges["temperature"].minimum, ranges["temperature"].maximum, value=d.temperature,
                                  step=0.01, label="Temperature", elem_id=f"compare-temperature-{label}"),
                        gr.Slider(ranges["top_p"].minimum, ranges["top_p"].maximum, value=d.top_p, step=0.01,
                                  label="Top p", elem_id=f"compare-top-p-{label}"),
                        gr.Number(value=i + 1, precision=0, label="Seed (-1 = random)",
                                  elem_id=f"compare-seed-{label}"),
                    ]
                stats.append(gr.Markdown("", elem_id=f"compare-stats-{label}", elem_classes="stats-line"))
                outputs.append(gr.Markdown("", elem_id=f"compare-out-{label}", sanitize_html=True,
                                           latex_delimiters=LATEX_DELIMITERS, container=True, min_height=120))
            columns.append(col)
    record = gr.State(None)
    with gr.Row():
        vote_buttons = {c: gr.Button(VOTES[c], elem_id=f"vote-{c}", visible=c in ("A", "B", "tie", "both_bad"))
                        for c in ("A", "B", "C", "D", "tie", "both_bad")}
    note = gr.Textbox(label="Note (saved with the vote)", elem_id="compare-note")
    vote_status = gr.Markdown("", elem_id="vote-status")
    with gr.Row():
        export = gr.Button("Export comparison (JSON)", size="sm", elem_id="compare-export-btn")
        export_file = gr.File(label="Download", elem_id="compare-export-file", interactive=False,
                              visible=False)  # shown once a comparison was exported

    def show_columns(n):
        n = int(n)
        return ([gr.update(visible=i < n) for i in range(MAX_COLUMNS)]
                + [gr.update(visible=c == "tie" or LABELS.index(c) < n) for c in ("A", "B", "C", "D")])

    n_columns.change(show_columns, n_columns, [*columns, *(vote_buttons[c] for c in "ABCD")],
                     api_visibility="private")
    run_event = dict(fn=gpu_for(backend, 2)(compare.run), inputs=[prompt, n_columns, max_new_tokens, *column_inputs],
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
    gr.Markdown("### Arena: two answers, names hidden\nTick what to draw from (the base model counts); two of them "
                "answer the prompt above as A and B, and their names are shown after your vote. A vote made after "
                "showing the names, or on an empty or failed answer, is kept but not counted on the Leaderboard.")
    w = {"state": gr.State(None)}
    w["pool"] = gr.CheckboxGroup(adapter_choices, label="Draw from", elem_id="arena-pool",
                                 value=[v for label, v in adapter_choices if not label.endswith("(unavailable)")])
    w["run"] = gr.Button("Draw two and run", variant="primary", elem_id="arena-run")
    with gr.Row(equal_height=False):
        for label in "AB":
            with gr.Column(min_width=220):
                gr.Markdown(f"### {label}")
                w[f"stats-{label}"] = gr.Markdown("", elem_id=f"arena-stats-{label}", elem_classes="stats-line")
                w[f"out-{label}"] = gr.Markdown("", elem_id=f"arena-out-{label}", sanitize_html=True,
                                                latex_delimiters=LATEX_DELIMITERS, container=True, min_height=120)
    with gr.Row():
        w["votes"] = {c: gr.Button(VOTES[c], elem_id=f"arena-vote-{c}") for c in ARENA_VOTES}
        w["reveal"] = gr.Button("Show names", elem_id="arena-reveal")
    w["note"] = gr.Textbox(label="Note (saved with the vote)", elem_id="arena-note")
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
    w["run"].click(gpu_for(arena.backend, 1)(arena.run), [compare["prompt"], compare["max_new_tokens"], w["pool"]], shown,
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
    gr.Markdown("Bradley–Terry ratings of adapters from the counted Compare and arena votes (a tie or \"both bad\" "
                "is half a win each way), on an Elo-like scale (400 points = 10:1 odds), with 95% intervals from "
                "bootstrap resampling. An interval narrows like 1/√games: *Games for ±50* says how many an adapter "
                "needs for an interval of ±50 points.")
    w = {}
    with gr.Row():
        w["range"] = gr.Radio(list(TIME_RANGES), value="All time", label="Votes from", elem_id="board-range")
        w["anonymous"] = gr.Checkbox(False, label="Anonymous (arena) votes only", elem_id="board-anonymous")
        w["refresh"] = gr.Button("Refresh", size="sm", elem_id="board-refresh")
    w["table"] = gr.Markdown("", elem_id="board-table")
    gr.Markdown("#### Win rate of each row against each column (games below it)")
    w["heat"] = gr.HTML("", elem_id="board-heat")
    w["notes"] = gr.Markdown("", elem_id="board-notes")
    return w


def wire_leaderboard(store, tab, w: dict) -> None:
    def show(time_range, anonymous_only):
        return leaderboard(store.votes, time_range, anonymous_only)

    for trigger in (tab.select, w["refresh"].click, w["range"].input, w["anonymous"].input):
        trigger(show, [w["range"], w["anonymous"]], [w["table"], w["heat"], w["notes"]], concurrency_id="leaderboard",
                concurrency_limit=2, api_visibility="private")


def create_model_panel(backend, picker: AdapterHandlers, adapter: gr.State, adapter_choices: list) -> dict:
    w, caps = {}, backend.capabilities()
    with gr.Row():
        with gr.Column(scale=3):
            w["info"] = gr.Markdown(model_handlers.model_info_markdown(backend), elem_id="model-info")
            gr.Markdown(model_handlers.capabilities_note(caps), elem_id="capabilities-note",
                        visible=bool(caps.unavailable()))
            gr.Markdown(f"#### Adapters in `{backend.adapters_dir}/`" if caps.adapter_loading is None else
                        "#### Adapters served by the model server")
            w["adapter_table"] = gr.Markdown(picker.table(None), elem_id="adapter-table")
        with gr.Column(scale=2, elem_id="model-options"):
            gr.Markdown("#### LoRA adapter")
            w["adapter"] = gr.Dropdown(adapter_choices, value=BASE, label="Adapter for this tab",
                                       elem_id="adapter-choice",
                                       info="Loads it once (then switching is instant) and applies it to this "
                                            "tab's next reply; the base model is not reloaded.")
            w["adapter_status"] = gr.Markdown(picker.status(None), elem_id="adapter-status")
            with gr.Row():
                w["adapter_spec"] = gr.Textbox(show_label=False, scale=3, elem_id="adapter-spec",
                                               placeholder="load by hub id (owner/name) or folder in the adapters "
                                                           "folder" if caps.adapter_loading is None else
                                               caps.adapter_loading, interactive=caps.adapter_loading is None)
                w["adapter_load"] = gr.Button("Load", scale=1, min_width=60, elem_id="adapter-load-btn",
                                              interactive=caps.adapter_loading is None)
            w["adapter_refresh"] = gr.Button("Refresh adapter list", size="sm", elem_id="adapter-refresh-btn")
            gr.Markdown("#### Quantization and precision")
            with gr.Row():
                w["quant"] = gr.Dropdown(model_handlers.quant_choices(backend),
                                         value=backend.info().quant if caps.quantization is None else None,
                                         label="Quantization", elem_id="quant-choice", scale=3,
                                         interactive=caps.quantization is None,
                                         info=caps.quantization or "Frees the current weights, then loads the "
                                              "checkpoint in this mode; adapters are re-applied. On failure the "
                                              "previous mode is loaded again.")
                quantize = gr.Button("Reload quantized", scale=1, min_width=80, elem_id="quant-reload-btn",
                                     interactive=caps.quantization is None)
            w["dtype"] = gr.Radio(list(DTYPES), value=backend.dtype_choice,
                                  label="Precision (dtype)", elem_id="dtype-choice",
                                  interactive=caps.dtype_switch is None,
                                  info=caps.dtype_switch or "Reloading frees the current model first, then loads "
                                       "the new one; chat histories and loaded adapters are kept. If it fails, "
                                       "the previous precision is loaded again.")
            reload = gr.Button("Reload model", variant="primary", elem_id="reload-btn",
                               interactive=caps.dtype_switch is None)
            refresh = gr.Button("Refresh info", size="sm", elem_id="refresh-info-btn")

    def do_reload(choice, active, progress=gr.Progress()):
        return model_handlers.reload_model(backend, choice, progress), picker.table(active)

    reload.click(do_reload, [w["dtype"], adapter], [w["info"], w["adapter_table"]], concurrency_id="reload",
                 concurrency_limit=1, api_visibility="private")

    def do_quantize(mode, active, progress=gr.Progress()):
        return model_handlers.switch_quantization(backend, mode, progress), picker.table(active)

    quantize.click(do_quantize, [w["quant"], adapter], [w["info"], w["adapter_table"]], concurrency_id="reload",
                   concurrency_limit=1, api_visibility="private")
    refresh.click(lambda: model_handlers.model_info_markdown(backend), None, w["info"], concurrency_limit=None,
                  api_visibility="private")
    return w
