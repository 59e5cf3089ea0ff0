"""Small helpers that drive the chat tab the way a person does (type, press keys, read what is shown)."""

from __future__ import annotations

STATS = "#chat-stats"
# Long enough to act while a reply streams on a busy machine: with seed 1 the demo model writes 9,357 tokens before
# its first stop token, so a reply with this cap lasts 3x longer than one of 3,000 (about 10-25 s on 2 cores).
# Tests lower the slider where they need short replies.
MAX_NEW_TOKENS = 9000


def set_number(page, elem_id: str, value) -> None:
    """Type into the number box of a slider / number field and commit it."""
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")
    box.blur()


def stats_text(page) -> str:
    return page.locator(STATS).inner_text()


def request_id(stats: str) -> str:
    return stats.rsplit("req-", 1)[1].strip() if "req-" in stats else ""


def wait_finished(page, previous: str = "", timeout: float = 180_000) -> str:
    """Wait until the stats line shows a finished request other than the one in `previous`; return it."""
    page.wait_for_function(
        """([sel, prev]) => { const t = (document.querySelector(sel) || {}).innerText || "";
            const m = t.match(/req-(\\S+)/);
            return t.includes("tokens/s") && !t.includes("generating") && m && m[1] !== prev; }""",
        arg=[STATS, request_id(previous)], timeout=timeout)
    return stats_text(page)


def send(page, text: str) -> None:
    box = page.locator("#chat-input textarea")
    box.fill(text)
    box.press("Enter")


def bot_messages(page) -> list[str]:
    return page.locator('#chatbot [data-testid="bot"]').all_inner_texts()


def user_messages(page) -> list[str]:
    return page.locator('#chatbot [data-testid="user"]').all_inner_texts()


def new_tokens(stats: str) -> int:
    return int(stats.split("(")[1].split(" new")[0])


def open_tab(page, name: str) -> None:
    page.locator(f"button[role=tab]:has-text('{name}')").first.click()


def choose(page, elem_id: str, option: str) -> None:
    """Pick `option` (its label) in the dropdown `elem_id`, as a person does: open it, click the option."""
    box = page.locator(f"#{elem_id} input")
    box.click()
    options = page.locator(f"#{box.get_attribute('aria-controls')}")  # lists of other dropdowns may linger
    options.get_by_role("option", name=option, exact=True).click()


def dropdown_value(page, elem_id: str) -> str:
    return page.locator(f"#{elem_id} input").input_value()


def wait_model_info(page, row: str, value: str, timeout: float = 120_000) -> None:
    """Wait until the Model tab's info table has `value` in its `row` cell: the table is the reload's output,
    so this holds only once the reload finished (the progress text above it may name the value earlier)."""
    page.wait_for_function(
        """([row, value]) => [...document.querySelectorAll('#model-info tr')].some(tr => {
            const cells = [...tr.querySelectorAll('td, th')].map(c => c.innerText.trim());
            return cells.length >= 2 && cells[0] === row && cells[1] === value; })""",
        arg=[row, value], timeout=timeout)


def run_compare(page, prompt: str, max_new_tokens: int, labels: str = "AB") -> None:
    """In the Compare tab: run `prompt` in every column and wait until each column's stats say it finished."""
    set_number(page, "compare-max-new-tokens", max_new_tokens)
    page.locator("#compare-prompt textarea").fill(prompt)
    page.locator("#compare-run").click()
    for label in labels:
        page.wait_for_function(
            f"() => /tokens\\/s.*(stop|length)/.test(document.querySelector('#compare-stats-{label}')?.innerText||'')")
