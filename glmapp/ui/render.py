"""Safe rendering of chat text: Markdown with code and LaTeX, but never live HTML.

Notable choices:
- Text is made inert BEFORE any Markdown renderer sees it: outside code and math, `<` and `&` are
  escaped (so `<script>` and `<img onerror=...>` show as text), links whose target uses a
  script-capable scheme (`javascript:`, `vbscript:`, `data:`) are turned into plain text, and any
  remaining such scheme gets a zero-width space so no browser can read it as a URL scheme.
- Code spans/blocks are left alone: Markdown renderers escape their content themselves. Math spans
  are left alone so formulas keep `<`, `&`; KaTeX (browser) and latex2mathml (export) escape them.
- The chatbot's own sanitizer (`sanitize_html=True`) stays on as a second layer; exported pages get
  a Content-Security-Policy that forbids scripts as a third.
- Control characters the model may emit are dropped for display (newline and tab kept).
"""

from __future__ import annotations

import html
import re
import unicodedata

# Code fences, inline code, then math: $$..$$, \[..\], \(..\), $..$ (single-line, no space after `$`).
_PROTECTED = re.compile(
    r"(?P<fence>^[ \t]*(?P<tick>`{3,}|~{3,})[^\n]*\n.*?(?:^[ \t]*(?P=tick)[ \t]*$|\Z))"
    r"|(?P<code>(?P<bt>`+)(?!`).+?(?<!`)(?P=bt)(?!`))"
    r"|(?P<math>\$\$.+?\$\$|\\\[.+?\\\]|\\\(.+?\\\)|\$(?=\S)[^$\n]+?(?<=\S)\$)",
    re.DOTALL | re.MULTILINE,
)
_BAD_SCHEME = r"(?:java|vb)script|data|file"
_BAD_LINK = re.compile(r"\[([^\]\n]*)\]\(\s*<?\s*(" + _BAD_SCHEME + r")\s*:", re.IGNORECASE)
_BAD_REF = re.compile(r"^(\s*)\[([^\]\n]+)\]:\s*<?\s*(" + _BAD_SCHEME + r")\s*:", re.IGNORECASE | re.MULTILINE)
_SCHEME = re.compile(r"\b(" + _BAD_SCHEME + r")(\s*):", re.IGNORECASE)
_ZWSP = "\u200b"
LATEX_DELIMITERS = [
    {"left": "$$", "right": "$$", "display": True},
    {"left": "\\[", "right": "\\]", "display": True},
    {"left": "\\(", "right": "\\)", "display": False},
    {"left": "$", "right": "$", "display": False},
]


def strip_control(text: str) -> str:
    """Drop control/format characters (keep newline, tab, ZWJ/ZWNJ) and lone surrogates."""
    return "".join(ch for ch in text if ch in "\n\t\u200c\u200d"
                   or unicodedata.category(ch) not in ("Cc", "Cf", "Cs"))


def _inert_text(text: str) -> str:
    text = html.escape(text, quote=False).replace("&gt;", ">")  # `>` cannot open a tag; keeps blockquotes
    # Brackets as entities: shown as `[x]`, never parsed as a link (a backslash escape would clash with `\[` math).
    text = _BAD_LINK.sub(lambda m: f"&#91;{m.group(1)}&#93;({m.group(2)}{_ZWSP}:", text)
    text = _BAD_REF.sub(lambda m: f"{m.group(1)}&#91;{m.group(2)}&#93;: {m.group(3)}{_ZWSP}:", text)
    return _SCHEME.sub(lambda m: f"{m.group(1)}{_ZWSP}{m.group(2)}:", text)


def _inert_math(text: str) -> str:
    # Math stays raw for KaTeX, but an unbalanced `$` could end it early and expose the rest: escape tags anyway.
    return text.replace("<", "\\lt ").replace(">", "\\gt ") if "<" in text or ">" in text else text


def safe_markdown(text: str) -> str:
    """Markdown source in which no HTML, script or script URL survives, code and formulas intact."""
    text = strip_control(text or "")
    out, pos = [], 0
    for m in _PROTECTED.finditer(text):
        out.append(_inert_text(text[pos:m.start()]))
        out.append(_inert_math(m.group()) if m.group("math") else m.group())
        pos = m.end()
    out.append(_inert_text(text[pos:]))
    return "".join(out)


def response_text(response) -> str:
    """A chat response as display text: v3 tool calls / metadata turns are shown as a labelled block."""
    if isinstance(response, dict):
        body = response.get("content")
        if body is None:
            body = "\n".join(f"{k} = {v!r}" for k, v in response.get("parameters", {}).items())
        return f"**{response.get('name', 'tool')}**\n```\n{body}\n```"
    return str(response)


def chatbot_messages(messages: list[dict]) -> list[dict]:
    """Session messages (role/content dicts) -> what gr.Chatbot shows, every message made inert."""
    return [{"role": m["role"], "content": safe_markdown(m["content"])} for m in messages
            if m["role"] in ("user", "assistant")]
