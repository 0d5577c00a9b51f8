"""The demo in a real browser: send a message, see two answers, vote; nothing from a prompt, an answer or an
adapter name runs as HTML. Debian's chromium driven by Playwright (its own browser download does not work here).

This is the only test of the page and of its sanitising, so where it must run (CI: `CI` set and not false) a
missing chromium or Playwright fails it; elsewhere it is skipped and `-ra` prints why. Screenshots of the chat
and of the A/B tab are saved in the test's tmp folder (their paths are printed).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.browser


def _required() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _missing(what: str) -> None:
    if _required():
        pytest.fail(f"{what}; CI must run the browser test (make browser-deps installs chromium as root)")
    pytest.skip(f"{what} (make browser-deps installs it as root); CI fails here instead of skipping")


ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]
EVIL_PROMPT = 'Hi <img src=x onerror="window.__pwned=1"> <script>window.__pwned=2</script>'
EVIL_ANSWER = (' <img src=y onerror="window.__pwned=3"><svg onload="window.__pwned=4"></svg>'
               '<a href="javascript:window.__pwned=5">link</a>')
EVIL_NAME = "evil<img src=z onerror=window.__pwned=6>"
EVIL_SYSTEM = "</textarea></script><script>window.__pwned=8</script> You are polite."  # from a (pulled) manifest


class HtmlAnswers:
    """The real engine, except that the adapter's answers end with HTML that would run if rendered raw."""

    def __init__(self, engine):
        self._engine = engine

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def stream_compare(self, *args, **kwargs):
        for base, adapter in self._engine.stream_compare(*args, **kwargs):
            yield base, adapter + EVIL_ANSWER


@pytest.fixture(scope="module")
def sync_api():
    """Playwright's sync API, once chromium and Playwright are known to be there (checked before the app starts)."""
    if not CHROMIUM.exists():
        _missing(f"needs Debian's chromium at {CHROMIUM} (apt-get install chromium)")
    try:
        from playwright import sync_api
    except ImportError:
        _missing("needs the playwright package (pip install -e '.[dev]')")
    return sync_api


@pytest.fixture(scope="module")
def app_url(sync_api, tiny_base, tmp_path_factory):
    import torch

    from persona_lora.demo.app import build_demo
    from persona_lora.demo.engine import Engine
    from persona_lora.votes import VoteStore
    from tests.conftest import free_port
    from tests.test_demo import make_adapter

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    folder = make_adapter(tiny_base, tmp_path_factory.mktemp("adapters") / EVIL_NAME, "attention", seed=1,
                           system_prompt=EVIL_SYSTEM)
    engine = Engine(str(tiny_base), device="cpu", max_new_tokens_cap=16)
    engine.add_adapter(str(folder))
    votes = VoteStore(tmp_path_factory.mktemp("votes") / "votes.sqlite")
    app = build_demo(HtmlAnswers(engine), votes=votes, default_max_new_tokens=10, refresh_seconds=2,
                     arena=True)  # one adapter: the Arena tab only because it is asked for
    _, url, _ = app.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    yield url, votes
    app.close()
    engine.close()
    torch.set_num_threads(threads)


@pytest.fixture
def page(sync_api):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            yield browser.new_page(viewport={"width": 1400, "height": 1100})
        finally:
            browser.close()


def wait_stable(page, selector: str, timeout: float = 60) -> str:
    """Text of `selector` once it is non-empty and has not changed for a second (streaming finished)."""
    last, since, end = None, time.time(), time.time() + timeout
    while time.time() < end:
        text = page.locator(selector).last.inner_text() if page.locator(selector).count() else ""
        if text != last:
            last, since = text, time.time()
        elif text.strip() and time.time() - since > 1.0:
            return text
        time.sleep(0.2)
    raise AssertionError(f"{selector} did not settle: {last!r}")


def assert_nothing_ran(page):
    """No injected script ran, and none is left in the page to run later (event handlers, scripts, js: links)."""
    assert page.evaluate("typeof window.__pwned") == "undefined"
    found = page.evaluate("""() => ({
        handlers: document.querySelectorAll('[onerror], [onload]').length,
        scripts: Array.from(document.querySelectorAll('script'))  // Gradio's config blob escapes '<' (\\u003c)
            .filter(s => s.textContent.includes('__pwned') && !s.textContent.startsWith('window.gradio_')).length,
        js_links: Array.from(document.querySelectorAll('a[href]'))
            .filter(a => a.getAttribute('href').trim().toLowerCase().startsWith('javascript')).length,
    })""")
    assert found == {"handlers": 0, "scripts": 0, "js_links": 0}


def save_shot(page, tmp_path: Path, key: str) -> Path:
    out = tmp_path / f"persona-lora-demo-{key}.png"
    page.screenshot(path=str(out), full_page=True)
    print(f"screenshot: {out}")
    return out


def test_chat_and_blind_vote_in_the_browser(app_url, page, tmp_path):
    url, votes = app_url
    page.goto(url)
    page.wait_for_selector("#chat-message textarea", timeout=60_000)
    assert EVIL_NAME in page.locator("#adapter-chat").inner_text()  # the name is shown as text, not as a tag
    assert EVIL_NAME in page.locator("#sides-info").inner_text()
    # the manifest's prompt, prefilled verbatim
    assert page.locator("#system-prompt textarea").input_value() == EVIL_SYSTEM

    page.fill("#chat-message textarea", EVIL_PROMPT)
    page.click("#chat-send")
    page.wait_for_selector('#base-chat [data-testid="bot"]', timeout=60_000)
    page.wait_for_selector('#adapter-chat [data-testid="bot"]', timeout=60_000)
    base = wait_stable(page, '#base-chat [data-testid="bot"]')
    adapter = wait_stable(page, '#adapter-chat [data-testid="bot"]')
    assert base.strip() and adapter.strip() and "link" in adapter
    assert "Hi" in page.locator('#base-chat [data-testid="user"]').inner_text()
    assert_nothing_ran(page)
    save_shot(page, tmp_path, "chat")

    page.get_by_role("tab", name="Blind A/B").click()
    page.fill("#ab-message textarea", "Who are you? <img src=q onerror=window.__pwned=7>")
    page.click("#ab-go")
    page.wait_for_selector("#vote-A:not([disabled])", timeout=60_000)
    a_text = wait_stable(page, '#a-chat [data-testid="bot"]')
    b_text = wait_stable(page, '#b-chat [data-testid="bot"]')
    assert a_text.strip() and b_text.strip() and ("link" in a_text) != ("link" in b_text)  # one of them is the adapter
    page.click("#vote-A")
    page.wait_for_function("document.querySelector('#ab-reveal').innerText.includes('You voted')", timeout=30_000)
    reveal = page.locator("#ab-reveal").inner_text()
    assert "A is better" in reveal and ("A was the base" in reveal or f"A was adapter {EVIL_NAME}" in reveal)
    page.wait_for_function("document.querySelector('#win-rates').innerText.includes('evil')", timeout=30_000)
    assert_nothing_ran(page)
    save_shot(page, tmp_path, "ab")

    rows = votes.votes()
    assert len(rows) == 1 and rows[0]["vote"] == "A" and rows[0]["adapter_name"] == EVIL_NAME
    assert rows[0]["winner"] == rows[0]["a_side"]
    assert ("link" in rows[0]["answer_a"]) == (rows[0]["a_side"] == "adapter")


def test_arena_battle_in_the_browser(app_url, page, tmp_path):
    """A battle of the base against the (HTML-answering) adapter: two anonymous answers, a vote, the names revealed
    as text, the leaderboard row; nothing from a prompt, an answer or a name runs."""
    url, votes = app_url
    before = votes.count()
    page.goto(url)
    page.wait_for_selector("#chat-message textarea", timeout=60_000)
    page.get_by_role("tab", name="Arena").click()
    page.fill("#arena-message textarea", "Who are you? <img src=q onerror=window.__pwned=9>")
    page.click("#arena-go")
    page.wait_for_selector("#arena-vote-B:not([disabled])", timeout=60_000)
    a_text = wait_stable(page, '#arena-a [data-testid="bot"]')
    b_text = wait_stable(page, '#arena-b [data-testid="bot"]')
    assert a_text.strip() and b_text.strip() and ("link" in a_text) != ("link" in b_text)
    shown = page.locator("#arena-a").inner_text() + page.locator("#arena-b").inner_text()
    assert EVIL_NAME not in shown and "base" not in shown  # blind until the vote (the panes are Model A and B)
    page.click("#arena-vote-B")
    page.wait_for_function("document.querySelector('#arena-reveal').innerText.includes('You voted')", timeout=30_000)
    reveal = page.locator("#arena-reveal").inner_text()
    assert "B is better" in reveal and EVIL_NAME in reveal
    page.wait_for_function("document.querySelector('#arena-table').innerText.includes('evil')", timeout=30_000)
    assert_nothing_ran(page)
    save_shot(page, tmp_path, "arena")
    rows = votes.votes()
    assert len(rows) == before + 1 and rows[-1]["settings"]["mode"] == "arena" and rows[-1]["vote"] == "B"
    assert ("link" in rows[-1]["answer_b"]) == (rows[-1]["winner"] == "adapter")


@pytest.fixture(scope="module")
def quickstart_url(sync_api, tiny_base, trained_adapter):
    """The demo as the quickstart serves it: the tiny random base and an adapter trained by `persona-lora train`."""
    from persona_lora.demo.app import build_demo
    from persona_lora.demo.engine import Engine
    from tests.conftest import free_port

    engine = Engine(str(tiny_base), device="cpu", max_new_tokens_cap=48)
    engine.add_adapter(str(trained_adapter))
    app = build_demo(engine, votes=None, default_max_new_tokens=48)
    _, url, _ = app.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    yield url
    app.close()
    engine.close()


def test_what_a_newcomer_sees_and_the_panes_stack_on_a_narrow_window(quickstart_url, sync_api, tmp_path):
    """The page of `make quickstart`: the note that the base has random weights, two answers without control or
    replacement characters; on a 420 px window the panes stack instead of squeezing side by side. The wide
    screenshot is the README's (`PERSONA_LORA_SCREENSHOT=docs/demo.png` saves it there)."""
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(quickstart_url)
            page.wait_for_selector("#chat-message textarea", timeout=60_000)
            assert "random weights" in page.locator("#sides-info").inner_text()
            page.fill("#chat-message textarea", "你是谁？")
            page.click("#chat-send")
            base = wait_stable(page, '#base-chat [data-testid="bot"]', timeout=120)
            adapter = wait_stable(page, '#adapter-chat [data-testid="bot"]', timeout=120)
            for answer in (base, adapter):
                assert answer.strip() and "\ufffd" not in answer
                assert not any(ord(c) < 32 and c not in "\n\t" for c in answer)
            shot = save_shot(page, tmp_path, "quickstart")
            if os.environ.get("PERSONA_LORA_SCREENSHOT"):
                page.evaluate("window.scrollTo(0, 0)")
                page.screenshot(path=os.environ["PERSONA_LORA_SCREENSHOT"], full_page=False)
            wide_base, wide_adapter = (page.locator(s).bounding_box() for s in ("#base-chat", "#adapter-chat"))
            assert abs(wide_base["y"] - wide_adapter["y"]) < 5 and wide_adapter["x"] > wide_base["x"]  # side by side
            page.set_viewport_size({"width": 420, "height": 900})
            page.wait_for_timeout(500)
            narrow_base, narrow_adapter = (page.locator(s).bounding_box() for s in ("#base-chat", "#adapter-chat"))
            assert narrow_adapter["y"] >= narrow_base["y"] + narrow_base["height"] - 1, (narrow_base, narrow_adapter)
            assert narrow_base["width"] > 300  # each pane takes the window's width, not ~155 px
            save_shot(page, tmp_path, "narrow")
            assert shot.exists()
        finally:
            browser.close()
