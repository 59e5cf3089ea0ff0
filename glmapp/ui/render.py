"""Safe rendering of chat text: Markdown with code and LaTeX, but never live HTML or a remote fetch.

Notable choices:
- Text is made inert BEFORE any Markdown renderer sees it: outside code and math, `<` and `&` are
  escaped (so `<script>` and `<img onerror=...>` show as text), links whose target uses a
  script-capable scheme (`javascript:`, `vbscript:`, `data:`) are turned into plain text, and any
  remaining such scheme gets a zero-width space so no browser can read it as a URL scheme.
- Nothing in a message makes the browser fetch a URL (a manipulated reply could send the conversation
  out in one): the `!` of Markdown image syntax (inline, reference or shortcut) becomes an entity, so
  `![t](url)` shows as `!` and a link to the URL; Gradio's Mermaid diagrams (whose labels can load
  images) are shown as their source. KaTeX keeps `trust` off, so `\includegraphics`/`\href` stay inert.
- A single `~` is shown as itself (the chatbot's Markdown reads `~a~` as strikethrough: `~/x,~/y`
  lost its tildes); `~~strike~~` still works.
- Code spans/blocks are left alone: Markdown renderers escape their content themselves. Math keeps
  its TeX; only `<` and `&` are rewritten so that math which another renderer does not take for
  math cannot expose a tag: `\lt `/`\gt ` in math mode, entities inside `\text{...}` (where `\lt`
  would show literally; the browser decodes the entity before KaTeX reads the text, and
  latex2mathml copies it into `<mtext>` as is).
- The chatbot's own sanitizer (`sanitize_html=True`) stays on as a second layer; exported pages are
  sanitized again and get a Content-Security-Policy that forbids scripts as a third.
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
_IMAGE = re.compile(r"!(?=\[)")  # `![` starts every Markdown image form
# A lone `~`, unless inside a bare URL: marked takes the whole URL as an autolink first, and there the
# entity would end up in the link target.
_LONE_TILDE = re.compile(r"(?P<url>(?:https?://|www\.)[^\s<]*)|(?<!~)~(?!~)", re.IGNORECASE)
# Gradio renders a fence opened by exactly "```mermaid" as a diagram, wherever it sits (also in a quote or
# list, where _PROTECTED sees no fence); marked trims the info string, so "``` mermaid" is the same code block.
_MERMAID = re.compile(r"```(?=mermaid)")
# TeX commands whose argument is text, where `\lt` is not a command (shown literally).
_TEXT_GROUP = re.compile(r"\\(?:text(?:rm|sf|tt|bf|md|it|up|sl|normal)?|mbox|hbox)\s*\{")
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
    text = _IMAGE.sub("&#33;", text)
    text = _LONE_TILDE.sub(lambda m: m.group("url") or "&#126;", text)
    return _SCHEME.sub(lambda m: f"{m.group(1)}{_ZWSP}{m.group(2)}:", text)


def _text_group_end(math: str, start: int) -> int:
    """Index just past the `}` closing the group whose `{` ends at `start` (end of `math` if unbalanced)."""
    depth, i = 1, start
    while i < len(math):
        if math[i] == "\\":
            i += 1  # `\{`, `\}` are braces as text, not grouping
        elif math[i] == "{":
            depth += 1
        elif math[i] == "}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return len(math)


def _inert_math(math: str) -> str:
    # The renderers may not agree with _PROTECTED on where math ends (an unbalanced `$`), so what is left raw
    # here must stay inert as plain Markdown too: no `<` (tag), no `![` (image; `!{}[` is the same formula).
    out, pos = [], 0
    for m in _TEXT_GROUP.finditer(math):
        if m.start() < pos:
            continue  # a text command inside a text group: already escaped with its group
        end = _text_group_end(math, m.end())
        out.append(_inert_math_mode(math[pos:m.end()]))
        out.append(math[m.end():end].replace("&", "&amp;").replace("<", "&lt;").replace("![", "!{}["))
        pos = end
    out.append(_inert_math_mode(math[pos:]))
    return "".join(out)


def _inert_math_mode(math: str) -> str:
    return math.replace("<", "\\lt ").replace(">", "\\gt ").replace("![", "!{}[")


def safe_markdown(text: str) -> str:
    """Markdown source in which no HTML, script or script URL survives, code and formulas intact."""
    text = strip_control(text or "")
    out, pos = [], 0
    for m in _PROTECTED.finditer(text):
        out.append(_inert_text(text[pos:m.start()]))
        out.append(_inert_math(m.group()) if m.group("math") else m.group())
        pos = m.end()
    out.append(_inert_text(text[pos:]))
    return _MERMAID.sub("``` ", "".join(out))


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
