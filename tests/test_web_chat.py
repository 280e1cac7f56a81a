"""The built-in web chat in a real headless browser (Debian's chromium, driven by Playwright):
type a message, see the streamed reply and its speed, press Stop in the middle of a reply."""

from __future__ import annotations

import os
import shutil

import pytest
from conftest import start_server

playwright = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (.ci/run installs Debian's)")


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        yield browser
        browser.close()


def _chat_model():
    from racer_local.models import chat_model, resolve_model

    return resolve_model(chat_model())  # an instruction model: its replies end


@pytest.fixture(scope="module")
def page(browser):
    proc, url = start_server(_chat_model())
    page = browser.new_page(viewport={"width": 1000, "height": 700})
    page.goto(url + "/")
    yield page
    proc.terminate()
    proc.wait(timeout=20)


def test_a_message_gets_a_streamed_reply_with_its_speed(page, tmp_path):
    page.fill("#input", "Write a haiku about the sea.")
    page.press("#input", "Enter")
    page.wait_for_function("document.querySelector('.assistant:last-of-type .stats').textContent",
                           timeout=60000)
    stats = page.locator(".assistant .stats").last
    assert "tok/s" in stats.inner_text() and "tokens/step" in stats.inner_text()
    assert page.locator(".assistant").last.inner_text().strip()
    page.screenshot(path=os.environ.get("RACER_LOCAL_SCREENSHOT", str(tmp_path / "chat.png")))


def test_stop_really_stops_the_reply(page):
    page.click("#reset")
    page.select_option("#method", "ar")
    page.fill("#input", "Write a very long story about the sea, with many chapters.")
    page.press("#input", "Enter")
    page.wait_for_function("document.querySelectorAll('.assistant').length == 1 && "
                           "document.querySelector('.assistant:last-of-type div').textContent.length > 20",
                           timeout=60000)
    page.click("#stop")
    page.wait_for_function("document.querySelector('#send').disabled === false", timeout=10000)
    assert page.locator(".assistant .stats").last.inner_text() == "stopped"
    # the engine is free again: the next message is answered
    page.fill("#input", "Hi")
    page.press("#input", "Enter")
    page.wait_for_function("document.querySelectorAll('.assistant').length == 2 && "
                           "document.querySelector('#send').disabled === false", timeout=60000)
    assert "tok/s" in page.locator(".assistant .stats").last.inner_text()


def test_a_server_with_an_api_key_asks_for_it_once(browser):
    proc, url = start_server(_chat_model(), "--api-key", "s3cret")
    try:
        page = browser.new_page()
        asked = []
        page.on("dialog", lambda d: (asked.append(d.message), d.accept("s3cret")))
        page.goto(url + "/")
        page.fill("#input", "Say hello.")
        page.press("#input", "Enter")
        page.wait_for_function("document.querySelector('.assistant:last-of-type .stats').textContent",
                               timeout=60000)
        assert "tok/s" in page.locator(".assistant .stats").last.inner_text()
        assert len(asked) == 1 and "API key" in asked[0]
    finally:
        proc.terminate()
        proc.wait(timeout=20)
