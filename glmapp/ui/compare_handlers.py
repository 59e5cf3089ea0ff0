"""Compare tab handlers: one prompt, 2-4 columns with their own adapter and sampling, streamed side by side; votes.

All columns are submitted to the backend at once (`chat_streams`; each column read by its own thread), so the
engine sees them together and decodes them as one batch (with the inline engine, one call); the handler merges their
updates and yields all columns together. Columns may use different LoRA adapters (or the base model):
the engine mixes them in the same batch. Votes are appended, one JSON object per line, to a file.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from pathlib import Path

import gradio as gr

from glmapp.errors import GlmappError
from glmapp.ui import notices
from glmapp.ui.i18n import ENGLISH, error_text, lang_of, number, t, table
from glmapp.ui.adapter_handlers import BASE
from glmapp.ui.chat_handlers import STREAM_INTERVAL_S, ChatSettings, SettingRange, clean_input, setting_ranges
from glmapp.ui.export import write_json
from glmapp.ui.render import response_text, safe_markdown
from glmapp.ui.sessions import ActiveRequests, session_id

MAX_COLUMNS = 4
LABELS = "ABCD"
COLUMN_FIELDS = ("adapter", "temperature", "top_p", "seed")  # the per-column inputs, in this order
COLUMNS = SettingRange("Columns", 2, MAX_COLUMNS, whole=True, key="compare.columns")
VOTES = {"A": "A is better", "B": "B is better", "C": "C is better", "D": "D is better", "tie": "Tie",
         "both_bad": "Both bad"}


def column_stats(usage, finish_reason=None, adapter: str | None = None, lang: str = ENGLISH) -> str:
    model = t("stats.adapter", lang, name=safe_markdown(adapter)) if adapter else t("stats.base_model", lang)
    if usage is None:
        return f"{model} · {t('compare.waiting', lang)}"
    text = " · ".join((model, t("stats.speed", lang, rate=number(usage.tokens_per_second, lang, 1)),
                       t("conv.tokens", lang, n=usage.completion_tokens)))
    # English shows the engine's own word (stop, length, ...); other languages its translation.
    ending = t(f"finish.{finish_reason}", lang) if lang != ENGLISH and f"finish.{finish_reason}" in table(lang) \
        else finish_reason
    return text + (f" · {ending}" if finish_reason else "")


class CompareHandlers:
    def __init__(self, backend, comparisons_file: str | Path, active: ActiveRequests | None = None,
                 max_new_tokens: int | None = None):
        self.backend = backend
        self.max_new_tokens = max_new_tokens  # the server's cap (--max-new-tokens); None = the context length
        self.comparisons_file = Path(comparisons_file)
        self.active = active or ActiveRequests()
        self._file_lock = threading.Lock()

    def run(self, prompt, n_columns, max_new_tokens, *column_settings, request: gr.Request = None):
        """column_settings: (adapter, temperature, top_p, seed) for each of the 4 columns; adapter is a
        name, or None / "none" for the base model.

        Values arrive as sent (page or HTTP API); each is checked and a bad one gets a message naming it.
        Yields 4 outputs, 4 stats lines and the comparison record (None until all columns finish)."""
        lang = lang_of(request)
        prompt = clean_input(prompt)
        if not prompt.strip():
            raise gr.Error(t("compare.error_empty", lang))
        n = COLUMNS.check(n_columns, lang)
        sid = session_id(request)
        try:
            backend = self.backend
        except GlmappError as e:
            raise notices.error(e, lang) from None
        ranges = setting_ranges(backend.context_length, self.max_new_tokens)
        max_new_tokens = ranges["max_new_tokens"].check(max_new_tokens, lang)
        settings = []
        width = len(COLUMN_FIELDS)
        for i in range(n):
            adapter, temperature, top_p, seed = column_settings[width * i: width * (i + 1)]
            adapter = None if adapter in (None, "", BASE) else str(adapter)
            try:
                s = ChatSettings.from_inputs(ranges, adapter=adapter, seed=seed, max_length=backend.context_length,
                                             max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                             lang=lang)
            except gr.Error as e:
                raise gr.Error(t("compare.column_error", lang, column=LABELS[i], error=e.message)) from None
            try:
                s.sampling()
                backend.prepare_chat(prompt, [])  # input errors are reported before anything starts
                if adapter:  # instant when resident
                    self.backend.load_adapter(adapter)
            except GlmappError as e:
                raise notices.error(t("compare.column_error", lang, column=LABELS[i], error=error_text(e, lang))) \
                    from None
            settings.append(s)

        updates: queue.Queue = queue.Queue()
        handles: list = []
        stop = threading.Event()
        track = self.active.track(sid)

        def on_handle(h):
            handles.append(h)
            track(h)
            if stop.is_set():
                h.cancel()

        columns = [dict(max_new_tokens=s.max_new_tokens, params=s.sampling(), adapter=s.adapter) for s in settings]
        try:  # submitted together: one batch (one call with the inline engine)
            streams = backend.chat_streams(prompt, [], columns, on_handle=on_handle)
        except GlmappError as e:
            raise notices.error(e, lang) from None

        def consume(i: int, s: ChatSettings):
            try:
                for update in streams[i]:
                    updates.put((i, update))
                    if stop.is_set():
                        break
            except Exception as e:  # noqa: BLE001 - reported in that column, the others go on
                updates.put((i, e))
            finally:
                updates.put((i, None))

        threads = [threading.Thread(target=consume, args=(i, s), daemon=True, name=f"compare-{LABELS[i]}")
                   for i, s in enumerate(settings)]
        for thread in threads:
            thread.start()
        outputs, stats, finished = [""] * n, [column_stats(None, None, s.adapter, lang) for s in settings], 0
        results: list[dict] = [{} for _ in range(n)]
        last_yield = 0.0
        try:
            while finished < n:
                i, item = updates.get()
                if item is None:
                    finished += 1
                elif isinstance(item, Exception):
                    stats[i] = t("compare.failed", lang, error=error_text(item, lang))
                else:
                    outputs[i] = response_text(item.response)
                    stats[i] = column_stats(item.usage, item.finish_reason, settings[i].adapter, lang)
                    if item.error:
                        stats[i] = t("compare.failed", lang, error=item.error)
                    results[i] = {"finish_reason": item.finish_reason,
                                  "completion_tokens": item.usage.completion_tokens if item.usage else 0,
                                  "tokens_per_second": round(item.usage.tokens_per_second, 2) if item.usage else 0}
                now = time.monotonic()
                if finished < n and now - last_yield >= STREAM_INTERVAL_S:
                    last_yield = now
                    yield self._outputs(outputs, stats, None)
        finally:
            stop.set()
            for h in handles:
                h.cancel() if not h.done else None
                self.active.done(sid, h)
        record = {
            "prompt": prompt, "model": self.backend.info().name,
            "columns": [{"label": LABELS[i], "adapter": s.adapter,
                         "settings": {"temperature": s.temperature, "top_p": s.top_p,
                                      "seed": s.seed, "max_new_tokens": s.max_new_tokens},
                         "output": outputs[i], **results[i]} for i, s in enumerate(settings)],
        }
        yield self._outputs(outputs, stats, record)

    @staticmethod
    def _outputs(outputs, stats, record):
        padded = [safe_markdown(o) for o in outputs] + [""] * (MAX_COLUMNS - len(outputs))
        padded_stats = list(stats) + [""] * (MAX_COLUMNS - len(stats))
        return (*padded, *padded_stats, record)

    def vote(self, choice: str, note, record):
        """Append the finished comparison with the vote and note to the JSONL file -> status text."""
        if not record:
            raise gr.Error("Run a comparison first, then vote.")
        if choice not in VOTES:
            raise gr.Error(f"Unknown vote {choice!r}: use one of {', '.join(VOTES)}.")
        labels = [c["label"] for c in record["columns"]]
        if choice not in ("tie", "both_bad") and choice not in labels:
            raise gr.Error(f"There is no column {choice} in this comparison.")
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **record, "vote": choice,
                 "note": clean_input(note or "").strip()}
        self.comparisons_file.parent.mkdir(parents=True, exist_ok=True)
        with self._file_lock, self.comparisons_file.open("a", encoding="utf-8") as f:
            f.write(json.dumps(entry, ensure_ascii=False) + "\n")
        # The file name only: the server's folders are none of a visitor's business.
        return f"Saved: **{VOTES[choice]}** → `{self.comparisons_file.name}`"

    def export(self, record):
        if not record:
            raise gr.Error("Run a comparison first, then export it.")
        return write_json({"format": "glmapp.comparison/1", **record}, "comparison")
