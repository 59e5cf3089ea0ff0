"""What the chat shows in a real browser: nothing in a message fetches a URL or makes a script link, and text
(`~/x`, `\\text{<a>}`) is shown as typed. The user's message goes through the same renderer as the model's
replies (render.chatbot_messages), so sending the text is enough to drive it."""

from __future__ import annotations

import http.server
import threading

import pytest

from chat_page import send, set_number, wait_finished

USER = '#chatbot [data-testid="user"]'


class _Tracker(http.server.ThreadingHTTPServer):
    """A server on 127.0.0.1 that records the path of every request it gets."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Recorder)
        self.paths: list[str] = []
        self.changed = threading.Condition()
        self.base = f"http://127.0.0.1:{self.server_address[1]}"

    def wait_for(self, path: str, timeout: float = 30) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: path in self.paths, timeout), f"{path} never arrived: {self.paths}"


class _Recorder(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        with self.server.changed:
            self.server.paths.append(self.path)
            self.server.changed.notify_all()
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture()
def tracker():
    server = _Tracker()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def _send_and_wait_rendered(page, text: str, rendered: str) -> None:
    """Send `text`; wait for the reply to finish and for `rendered` (a selector inside the user message)."""
    set_number(page, "max-new-tokens", 4)
    send(page, text)
    wait_finished(page)
    page.locator(f"{USER} {rendered}").first.wait_for()


def _assert_nothing_fetched(page, tracker) -> None:
    """Call once the message is fully rendered: no request but the probe's reaches the tracker."""
    # "No request arrived" needs a point after which one would have. The app's image policy (server.py) keeps
    # the page from loading any image from another host, so the probe is a fetch() from the same page: it arrives
    # after any image request the rendered message started (those start when the element enters the DOM).
    # The DOM check below holds the renderer itself to it, whatever the policy does.
    page.evaluate("url => fetch(url, {mode: 'no-cors'}).catch(() => null)", f"{tracker.base}/probe")
    tracker.wait_for("/probe")
    assert tracker.paths == ["/probe"]
    assert page.locator(f'#chatbot img[src^="{tracker.base}"], #chatbot image').count() == 0


def test_images_in_messages_are_links_and_nothing_is_fetched(page, tracker):
    base = tracker.base
    text = f"![t]({base}/1) ![t][r] $\\includegraphics{{{base}/2}}$\n\n[r]: {base}/3"
    # Rendered once the image syntax became a link (fixed) or an <img> (unfixed) and KaTeX ran.
    _send_and_wait_rendered(page, text, f'a[href="{base}/1"], img[src="{base}/1"]')
    page.locator(f"{USER} .katex").first.wait_for()
    _assert_nothing_fetched(page, tracker)
    assert page.locator(f'{USER} a[href="{base}/1"]').count() == 1  # the image is a link the user may follow


def test_mermaid_diagrams_are_shown_as_source_and_fetch_nothing(page, tracker):
    # Gradio draws a fence opened by "```mermaid"; a label's HTML (kept by mermaid's "antiscript") loads images.
    text = f"```mermaid\ngraph TD\nA[\"<img src='{tracker.base}/4'>\"]\n```"
    _send_and_wait_rendered(page, text, "pre code, .mermaid svg")  # code (fixed) or a drawn diagram (unfixed)
    _assert_nothing_fetched(page, tracker)
    assert "graph TD" in page.locator(f"{USER} pre code").inner_text()


def test_href_in_math_makes_no_script_link(page, dialogs):
    # KaTeX's `trust` is off in Gradio (\href, \url, \includegraphics render as an error): keep it that way.
    _send_and_wait_rendered(page, "$$\\href{javascript:alert(1)}{x}$$ and [y](javascript:alert(2))", ".katex")
    found = page.evaluate("""() => [...document.querySelectorAll('#chatbot [href], #chatbot [src]')]
        .map(e => e.getAttribute('href') || e.getAttribute('src')).filter(u => /^\\s*javascript/i.test(u))""")
    assert found == []
    page.locator(f"{USER} .katex").first.click()
    assert dialogs == []


def test_tilde_and_text_in_math_are_shown_as_typed(page):
    _send_and_wait_rendered(page, "cd ~/x,~/y then $\\text{<a>} < b$", ".katex-html")
    shown = page.locator(USER).first
    assert "cd ~/x,~/y then" in shown.inner_text()
    assert shown.locator("del, s").count() == 0  # marked reads `~/x,~` as strikethrough unless escaped
    formula = "".join(shown.locator(".katex-html").inner_text().split())
    assert formula == "<a><b", formula  # not `\lt a\gt`


def test_the_page_loads_no_image_from_another_host(page, tracker):
    """The second layer: whatever ends up in the page, its images come from this server only."""
    # The image's error event fires only after the browser gave up on it: refused by the policy, or (without
    # it) after the tracker answered 404, which it does only after recording the request.
    outcome = page.evaluate("""url => new Promise(done => {
        let refused = false;
        document.addEventListener('securitypolicyviolation', e => { if (e.blockedURI.startsWith(url)) refused = true; });
        const img = new Image();
        img.onload = img.onerror = () => setTimeout(() => done(refused), 0);
        img.src = url + '/injected.png';
        document.body.append(img);
    })""", tracker.base)
    assert outcome is True  # the browser reports the image policy refused it
    assert "/injected.png" not in tracker.paths
    assert page.locator("#chatbot").count() == 1  # the app itself still renders under the policy
