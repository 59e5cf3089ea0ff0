"""Downloads: a conversation or a comparison as JSON, a conversation as a standalone HTML page.

The HTML page needs no network: formulas are converted to MathML by `mdtex2html` (rendered natively
by browsers), styles are inline, and a Content-Security-Policy forbids any script.

Message text is made inert before conversion (render.safe_markdown), and the converted HTML goes through
one more pass with a real HTML parser, since the converters add markup of their own: latex2mathml turns
`\href{javascript:...}{x}` into `<mrow href="javascript:...">`. That pass keeps a URL attribute only for
http(s), mailto or a relative URL, turns an image into a link, and drops scripts, styles and comments.
"""

from __future__ import annotations

import html
import json
import re
import tempfile
import time
from html.parser import HTMLParser
from pathlib import Path

import mdtex2html

from glmapp.ui.i18n import ENGLISH, t, table
from glmapp.ui.render import safe_markdown

_PAGE = """<!DOCTYPE html>
<html lang="{lang}"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'; img-src data:">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
body {{ font-family: system-ui, "Noto Sans CJK SC", "Source Han Sans SC", "PingFang SC", "Microsoft YaHei", sans-serif; max-width: 52rem; margin: 2rem auto; padding: 0 1rem; color: #1f2328; }}
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


_URL_ATTRS = {"href", "src", "xlink:href", "action", "formaction", "background", "poster", "cite", "srcset"}
_SAFE_SCHEMES = {"http", "https", "mailto"}
_URL_SCHEME = re.compile(r"([a-z][a-z0-9+.-]*):", re.IGNORECASE)
_DROPPED_WITH_CONTENT = {"script", "style"}


def _safe_url(value: str) -> bool:
    # Browsers ignore ASCII whitespace and control characters in a scheme (`java\tscript:`); the parser has
    # already decoded entities (`&#106;avascript:`).
    compact = re.sub(r"[\x00-\x20\x7f]+", "", value)
    scheme = _URL_SCHEME.match(compact)
    return scheme is None or scheme.group(1).lower() in _SAFE_SCHEMES


class _InertHtml(HTMLParser):
    """Re-writes an HTML fragment keeping text and tags, minus script-capable URLs and remote fetches."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self._skip = 0  # inside <script>/<style>

    def handle_starttag(self, tag, attrs, closing=""):
        if tag in _DROPPED_WITH_CONTENT:
            self._skip += not closing
            return
        if tag == "img":  # an image is shown as a link to it: the page itself fetches nothing
            src, alt = dict(attrs).get("src") or "", dict(attrs).get("alt") or "image"
            self.out.append(f'<a href="{html.escape(src)}">{html.escape(alt)}</a>' if _safe_url(src)
                            else html.escape(alt))
            return
        kept = "".join(f' {name}="{html.escape(value or "")}"' for name, value in attrs
                       if not name.startswith("on") and (name not in _URL_ATTRS or _safe_url(value or "")))
        self.out.append(f"<{tag}{kept}{closing}>")

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs, closing=" /")

    def handle_endtag(self, tag):
        if tag in _DROPPED_WITH_CONTENT:
            self._skip = max(0, self._skip - 1)
        elif tag != "img":
            self.out.append(f"</{tag}>")

    def handle_data(self, data):
        if not self._skip:
            self.out.append(html.escape(data, quote=False))


def inert_html(fragment: str) -> str:
    """`fragment` with every URL attribute limited to http(s)/mailto/relative, images as links, no scripts."""
    parser = _InertHtml()
    parser.feed(fragment)
    parser.close()
    return "".join(parser.out)


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


def render_html_page(record: dict, lang: str = ENGLISH) -> str:
    """A standalone page for a conversation record; message text is made inert before conversion."""
    parts = []
    for m in record["messages"]:
        body = inert_html(mdtex2html.convert(safe_markdown(m["content"]), extensions=["fenced_code", "tables"]))
        role = t(f"export.role.{m['role']}", lang) if f"export.role.{m['role']}" in table(lang) else m["role"]
        parts.append(f'<div class="msg {html.escape(m["role"])}"><div class="role">{html.escape(role)}</div>'
                     f"{body}</div>")
    model = record.get("model") or {}
    meta = t("export.exported", lang, when=record["exported_at"]) + (
        " · " + t("conv.model", lang, name=model.get("name")) if model.get("name") else "")
    return _PAGE.format(lang=lang, title=html.escape(t("export.title", lang)), meta=html.escape(meta),
                        body="\n".join(parts))


def write_json(record: dict, stem: str) -> str:
    path = _new_file(stem, ".json")
    path.write_text(json.dumps(record, ensure_ascii=False, indent=2), encoding="utf-8")
    return str(path)


def write_html(record: dict, stem: str = "conversation", lang: str = ENGLISH) -> str:
    path = _new_file(stem, ".html")
    path.write_text(render_html_page(record, lang), encoding="utf-8")
    return str(path)
