"""Training rows from data files, and the validation report shown before training.

Notable choices:
- Rows come from `glmapp.prompts.build_training_rows`: the chat template is the training template.
- Cleaning, in order: examples with an empty assistant reply are dropped, exact duplicates (same messages)
  are removed, then rows over `max_length` are truncated (the reply is cut, the end token lost) or
  dropped, by `overlength`. A row whose prompt alone is too long has nothing left to train and is dropped
  either way. If no row is left the data stops with `DataError`.
- The report counts what each step did, gives token-length percentiles (before truncation) and the share
  of Chinese characters among the non-space characters of the text.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field

from glmapp.prompts import build_training_rows
from glmapp.train.data import DataError, Record, read_file

OVERLENGTH = ("truncate", "drop")
FAMILIES = ("chatglm1", "chatglm2", "chatglm3")  # the families `build_training_rows` has a template for
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")


@dataclass
class Row:
    input_ids: list[int]
    labels: list[int]


@dataclass
class DataReport:
    """What validation found (JSON-serialisable: the model card and the Train tab show it)."""

    files: dict[str, dict] = field(default_factory=dict)  # file name -> {format, examples}
    examples: int = 0  # records read
    empty_replies_dropped: int = 0
    duplicates_removed: int = 0
    rows: int = 0  # rows trained on (a chatglm2 multi-turn example gives one per reply)
    over_length: int = 0
    over_length_action: str = "truncate"
    dropped_over_length: int = 0
    length_percentiles: dict[str, int] = field(default_factory=dict)  # p50/p90/p99/max, tokens
    chinese_share: float = 0.0
    trained_tokens: int = 0  # label tokens of the rows kept

    # The report's lines by key, in English; a UI words them in its language with the same values (`lines`).
    LINES = {
        "file": "{name}: {format} ({examples} examples)",
        "format": "Detected format: {files}",
        "examples": "Examples: {read} read, {empty} with an empty reply dropped, {duplicates} exact duplicates "
                    "removed -> {rows} training rows",
        "tokens": "Tokens per row: p50 {p50}, p90 {p90}, p99 {p99}, max {max}",
        "over": "Over max length: {over} ({action}; {dropped} dropped)",
        "chinese": "Chinese share of the text: {share}; trained tokens: {tokens}",
    }

    def lines(self, words=None) -> list[str]:
        """The report as lines; `words(key, **values)` words one (default: English, `LINES`)."""
        words = words or (lambda key, **values: self.LINES[key].format(**values))
        p = self.length_percentiles
        files = ", ".join(words("file", name=name, format=f["format"], examples=f["examples"])
                          for name, f in self.files.items())
        return [
            words("format", files=files),
            words("examples", read=self.examples, empty=self.empty_replies_dropped,
                  duplicates=self.duplicates_removed, rows=self.rows),
            words("tokens", p50=p.get("p50"), p90=p.get("p90"), p99=p.get("p99"), max=p.get("max")),
            words("over", over=self.over_length, action=self.over_length_action, dropped=self.dropped_over_length),
            words("chinese", share=f"{self.chinese_share:.0%}", tokens=self.trained_tokens),
        ]

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)


def _percentile(sorted_values: list[int], q: float) -> int:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def _text(messages: list[dict]) -> str:
    return "".join(m["content"] for m in messages)


def clean_records(records: list[Record], report: DataReport) -> list[Record]:
    """Drop examples with an empty trained reply and exact duplicates (first kept)."""
    kept, seen = [], set()
    for record in records:
        replies = [m for m in record.messages if m["role"] == "assistant" and m.get("loss", True)]
        if not replies or any(not m["content"].strip() for m in replies):
            report.empty_replies_dropped += 1
            continue
        key = json.dumps(record.messages, sort_keys=True, ensure_ascii=False)
        if key in seen:
            report.duplicates_removed += 1
            continue
        seen.add(key)
        kept.append(record)
    return kept


def fit(row: Row, max_length: int, overlength: str) -> Row | None:
    """The row cut to `max_length` tokens, or None when dropped or nothing trainable is left."""
    if len(row.input_ids) <= max_length:
        return row
    if overlength == "drop":
        return None
    labels = row.labels[:max_length]
    if all(x == -100 for x in labels):
        return None
    return Row(row.input_ids[:max_length], labels)


def build_rows(tokenizer, files: list[str], max_length: int, overlength: str = "truncate"
               ) -> tuple[list[Row], DataReport]:
    """Read, validate and encode `files` -> (rows, report); DataError on any bad file or no usable row."""
    if tokenizer.family not in FAMILIES:
        raise DataError(f"Training supports ChatGLM-6B, ChatGLM2 and ChatGLM3 models; this one is "
                        f"{tokenizer.family!r}.")
    if overlength not in OVERLENGTH:
        raise DataError(f"Unknown over-length action {overlength!r}: use one of {', '.join(OVERLENGTH)}.")
    if max_length < 8:
        raise DataError(f"max length {max_length} is too small: use at least 8 tokens (default 1024).")
    report = DataReport(over_length_action=overlength)
    records: list[Record] = []
    for file in files:
        fmt, found = read_file(file, tokenizer.family)
        report.files[found[0].file] = {"format": fmt, "examples": len(found)}
        records += found
    report.examples = len(records)
    records = clean_records(records, report)
    rows, lengths, chinese, chars = [], [], 0, 0
    for record in records:
        text = re.sub(r"\s", "", _text(record.messages))
        chinese += len(_CJK.findall(text))
        chars += len(text)
        for ids, labels in build_training_rows(tokenizer, record.messages):
            lengths.append(len(ids))
            if len(ids) > max_length:
                report.over_length += 1
            row = fit(Row(ids, labels), max_length, overlength)
            if row is None:
                report.dropped_over_length += 1
            else:
                rows.append(row)
    if lengths:
        lengths.sort()
        report.length_percentiles = {"p50": _percentile(lengths, 0.5), "p90": _percentile(lengths, 0.9),
                                     "p99": _percentile(lengths, 0.99), "max": lengths[-1]}
    report.chinese_share = chinese / chars if chars else 0.0
    report.rows = len(rows)
    report.trained_tokens = sum(sum(x != -100 for x in r.labels) for r in rows)
    if not rows:
        names = ", ".join(report.files)
        if report.over_length and report.dropped_over_length == len(lengths):
            raise DataError(f"{names}: every example is over the max length of {max_length} tokens (longest "
                            f"{lengths[-1]}); raise --max-length or shorten the examples.")
        raise DataError(f"{names}: no usable example ({report.empty_replies_dropped} with empty replies, "
                        f"{report.duplicates_removed} duplicates); every example needs a non-empty reply.")
    return rows, report
