"""The web playground end to end in headless Chromium (Debian's package, driven by Playwright): load the page, send a
message, watch the reply stream in, stop a long reply. Takes a screenshot; HERD_UPDATE_SCREENSHOT=1 writes it to
docs/playground.png (the one in docs/serving.md)."""

import os
import shutil
import time
from pathlib import Path

import pytest

from serve_utils import MODEL, gated_steps, make_llm, serve, wait_until

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "playground.png"

if not os.path.exists(CHROMIUM) and not os.environ.get("CI"):
    pytest.skip("Chromium is not installed (scripts/setup.sh installs it)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_api.sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(str(profile), executable_path=CHROMIUM, headless=True, args=FLAGS,
                                                   viewport={"width": 1200, "height": 720})
        yield ctx
        ctx.close()
    shutil.rmtree(profile, ignore_errors=True)


def wait_js(page, expr: str, timeout: float = 60, each=None):
    """Poll a JS expression from here: page.wait_for_function would eval inside the page, which its CSP forbids.
    `each` runs before every poll (the deadline is a failure guard)."""
    deadline = time.monotonic() + timeout
    while True:
        if each is not None:
            each()
        if page.evaluate(f"() => Boolean({expr})"):
            return
        assert time.monotonic() < deadline, f"timed out waiting for {expr}"
        time.sleep(0.02)


def test_playground_chat_streams_and_stops(browser, tmp_path, oracle):
    system, question = "You are a helpful assistant.", "Write a haiku about the sea."
    want = "".join(oracle.chat([{"role": "system", "content": system}, {"role": "user", "content": question}],
                               max_new_tokens=40, temperature=0, stream=True))
    # the gate lets the engine take one model call per poll of the page: the reply streams in token by token, and
    # the long second reply is surely still running when Stop is clicked
    with serve(make_llm()) as srv, gated_steps(srv.ctx.engine) as gate:
        page = browser.new_page()
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(srv.url + "/")
        wait_js(page, f"document.getElementById('model').textContent.startsWith('{MODEL}')")
        page.fill("#system", system)
        page.fill("#temperature", "0")
        page.fill("#max_tokens", "40")
        # count how often the reply's text changes while it streams
        page.evaluate("""() => { window.updates = 0; new MutationObserver((ms) => {
            for (const m of ms) if (m.target.closest && m.target.closest('.msg.assistant')) window.updates++; })
            .observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true}); }""")
        page.fill("#prompt", question)
        page.press("#prompt", "Enter")
        page.wait_for_selector(".msg.assistant.streaming")
        wait_js(page, "!document.querySelector('.msg.streaming') && "
                      "document.getElementById('stats').textContent.includes('finish')", each=gate.step)
        assert page.inner_text(".msg.user .text") == question
        assert page.text_content(".msg.assistant .text") == want
        assert page.evaluate("window.updates") >= 5  # streamed in pieces, not at once
        stats = page.inner_text("#stats")
        assert "40 tokens" in stats and "tok/s" in stats and "finish: length" in stats
        shot = SCREENSHOT if os.environ.get("HERD_UPDATE_SCREENSHOT") else tmp_path / "playground.png"
        page.screenshot(path=str(shot))
        assert shot.stat().st_size > 10_000

        # a second turn carries the history; Stop ends a long reply and frees the server's row
        page.fill("#max_tokens", "400")
        page.fill("#prompt", "And another one, much longer.")
        page.click("#send")
        wait_js(page, "document.querySelectorAll('.msg.assistant .text')[1].textContent.length > 0", each=gate.step)
        page.click("#stop")
        wait_js(page, "document.getElementById('stats').textContent.includes('finish: stopped')")
        assert len(page.query_selector_all(".msg")) == 4
        second = gate.handles[1]
        assert wait_until(lambda: second.cancelled), "Stop did not cancel the request on the server"
        gate.open()
        assert wait_until(lambda: srv.ctx.engine.running == 0)
        assert second.n_generated < 400
        assert srv.ctx.metrics.requests.get(endpoint="chat", finish="abort") == 1
        assert not errors
