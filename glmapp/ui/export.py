"""Downloads: a conversation or a comparison as JSON, a conversation as a standalone HTML page.

The HTML page needs no network: formulas are converted to MathML by `mdtex2html` (rendered natively
by browsers), styles are inline, and a Content-Security-Policy forbids any script.
"""

from __future__ import annotations

import html
import json
import tempfile
import time
from pathlib import Path

import mdtex2html

from glmapp.ui.render import safe_markdown

_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'; img-src data:">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 52rem; margin: 2rem auto; padding: 0 1rem; color: #1f2328; }}
.msg {{ border-radius: 10px; padding: .6rem 1rem; margin: .8rem 0; }}
.user {{ background: #eef4ff; }} .assistant {{ background: #f6f8fa; }} .system {{ background: #fff8e6; }}
.role {{ font-size: .8rem; font-weight: 600; color: #57606a; text-transform: uppercase; }}
pre {{ background: #0d1117; color: #e6edf3; padding: .8rem; border-radius: 6px; overflow-x: auto; }}
code {{ font-family: ui-monospace, monospace; }} .meta {{ color: #57606a; font-size: .85rem; }}
</style></head><body>
<h1>{title}</h1>
<p class="meta">{meta}</p>
{body}
</body></html>
"""


def export_dir() -> Path:
    path = Path(tempfile.gettempdir()) / "glmapp-exports"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _new_file(stem: str, suffix: str) -> Path:
    folder = Path(tempfile.mkdtemp(dir=export_dir()))
    return folder / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}{suffix}"


def conversation_record(messages: list[dict], system: str = "", model: dict | None = None,
                        settings: dict | None = None) -> dict:
    head = [{"role": "system", "content": system}] if system else []
    return {"format": "glmapp.conversation/1", "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "model": model or {}, "settings": settings or {},
            "messages": head + [{"role": m["role"], "content": m["content"]} for m in messages]}


def render_html_page(record: dict) -> str:
    """A standalone page for a conversation record; message text is made inert before conversion."""
    parts = []
    for m in record["messages"]:
        body = mdtex2html.convert(safe_markdown(m["content"]), extensions=["fenced_code", "tables"])
        parts.append(f'<div class="msg {html.escape(m["role"])}"><div class="role">{html.escape(m["role"])}</div>'
                     f"{body}</div>")
    model = record.get("model") or {}
    meta = f"Exported {record['exported_at']}" + (f" · model {model.get('name')}" if model.get("name") else "")
    return _PAGE.format(title="glmapp conversation", meta=html.escape(meta), body="\n".join(parts))


def write_json(record: dict, stem: str) -> str:
    path = _new_file(stem, ".json")
    path.write_text(json.dumps(record, ensure_ascii=False, indent=2), encoding="utf-8")
    return str(path)


def write_html(record: dict, stem: str = "conversation") -> str:
    path = _new_file(stem, ".html")
    path.write_text(render_html_page(record), encoding="utf-8")
    return str(path)
