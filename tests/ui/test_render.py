"""safe_markdown and the exported page: nothing fetched, no script URL, text shown as typed (real renderers)."""

from __future__ import annotations

import html
import re
from html.parser import HTMLParser

import markdown
import pytest

from glmapp.ui.export import conversation_record, inert_html, render_html_page
from glmapp.ui.render import safe_markdown

REMOTE = "http://127.0.0.1:9/track.png"
IMAGES = [f"![t]({REMOTE})", f"![t][r]\n\n[r]: {REMOTE}", f"![r]\n\n[r]: {REMOTE}", f'![t]( <{REMOTE}> "title")']
BAD_HREFS = ["javascript:alert(1)", "JaVaScRiPt:alert(1)", "&#106;avascript:alert(1)", " java\tscript:alert(1)",
             "vbscript:msgbox(1)", "data:text/html,<b>x</b>", "file:///etc/passwd"]


class _Attrs(HTMLParser):
    """Every (tag, attribute, value) of a page, values decoded as a browser decodes them."""

    def __init__(self, page: str):
        super().__init__()
        self.found: list[tuple[str, str, str]] = []
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        self.found += [(tag, name, value or "") for name, value in attrs]


def _page(*contents: str) -> str:
    return render_html_page(conversation_record([{"role": "user", "content": c} for c in contents]))


@pytest.mark.parametrize("source", IMAGES)
def test_markdown_images_become_links_that_fetch_nothing(source):
    out = markdown.markdown(safe_markdown(source))
    assert "<img" not in out and REMOTE in out  # the URL is still there to see (as a link or text)


def test_images_inside_math_stay_inert_when_a_renderer_does_not_take_them_for_math():
    out = safe_markdown(f"$x ![t]({REMOTE}) <img src={REMOTE}>$")
    inner = out.strip("$")  # as a Markdown renderer sees it if it ends the math early
    assert "<img" not in markdown.markdown(inner) and "<" not in inner


def test_mermaid_fences_are_shown_as_code_not_drawn():
    # Gradio draws a fence opened by exactly "```mermaid" as a diagram, and diagram labels can load images.
    for source in ("```mermaid\ngraph TD\n  A --> B\n```", "> ```mermaid\n> graph TD\n> ```",
                   "- ```mermaid\n  graph TD\n  ```"):
        out = safe_markdown(source)
        assert "```mermaid" not in out and "mermaid" in out


def test_a_lone_tilde_is_shown_as_itself_and_double_tilde_still_strikes():
    out = safe_markdown("cd ~/x,~/y then ~~gone~~ http://host/~me/")
    assert "~/x" not in out and html.unescape(out) == "cd ~/x,~/y then ~~gone~~ http://host/~me/"
    assert "~~gone~~" in out and "http://host/~me/" in out  # strikethrough and bare URLs untouched


def test_angle_brackets_inside_text_in_math_are_entities_not_backslash_lt():
    out = safe_markdown(r"$\text{<a> & {b}} < c \mbox{d<e}$ and $x > y$")
    assert r"\text{&lt;a> &amp; {b}}" in out and r"\mbox{d&lt;e}" in out
    assert r"\lt  c" in out and "<" not in out  # math mode keeps the TeX command: no tag can open
    page = _page(r"$\text{<a>} < b$")
    assert "<mtext>&lt;a&gt;</mtext>" in page and r"\lt" not in page


def test_exported_page_keeps_no_script_url_from_math_or_links():
    sources = [rf"$$\href{{{h}}}{{x}}$$" for h in BAD_HREFS] + [rf"$\href{{{h}}}{{x}}$" for h in BAD_HREFS]
    page = _page(*sources, r"$$\href{https://example.org/}{ok}$$")
    urls = [(tag, v) for tag, name, v in _Attrs(page).found if name in ("href", "src", "xlink:href")]
    assert ("mrow", "https://example.org/") in urls
    compact = [re.sub(r"[\x00-\x20]", "", v).lower() for _, v in urls]
    assert not [u for u in compact if u.split(":")[0] in ("javascript", "vbscript", "data", "file")], urls


def test_exported_page_references_no_remote_image():
    page = _page(*IMAGES, f"$x ![t]({REMOTE})$")
    assert not [a for a in _Attrs(page).found if a[0] == "img" or a[1] == "src"]
    assert f'<a href="{REMOTE}">t</a>' in page


def test_inert_html_drops_scripts_handlers_and_comments_and_keeps_text():
    out = inert_html('<p onclick="x()">a &amp; b &lt;c&gt;</p><script>steal()</script><style>*{}</style><!-- c -->'
                     f'<img src="{REMOTE}" alt="pic"><a href="/rel">r</a><a href="mailto:a@b">m</a><br/>')
    assert out == (f'<p>a &amp; b &lt;c&gt;</p><a href="{REMOTE}">pic</a><a href="/rel">r</a>'
                   '<a href="mailto:a@b">m</a><br />')
