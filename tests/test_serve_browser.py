"""The chat page in a real browser: Debian's Chromium, headless, driven by Playwright against a real server on
loopback. Type and press Enter, watch the answer stream in, regenerate, edit, stop, start over, slash commands."""
import os, shutil

import httpx
import pytest
from playwright import sync_api

from nanochat_nb.serve import ServerThread, create_app, load_pool

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# `make install` installs Debian's chromium where it can (as root, as in CI); on a laptop without it, and without
# root, these tests are skipped rather than failed. CI (CI=true) never skips them.
if not os.environ.get("CI") and not os.path.exists(CHROMIUM):
    pytest.skip("Debian's chromium is not installed (apt-get install chromium)", allow_module_level=True)

# Records every text the last assistant bubble shows while it streams, to see the answer grow.
WATCH = """() => {
  window.seen = [];
  new MutationObserver(() => {
    const last = [...document.querySelectorAll('.msg.assistant')].pop();
    if (last && last.textContent !== window.seen[window.seen.length - 1]) window.seen.push(last.textContent);
  }).observe(document.getElementById('chat'), {childList: true, subtree: true, characterData: true});
}"""
IDLE = "document.body.dataset.busy === '0'"


@pytest.fixture(scope="module")
def page(tiny_run):
    pool = load_pool(tiny_run, workers=1, seed=0)
    with ServerThread(create_app(pool)) as url, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        tab = browser.new_page()
        tab.set_default_timeout(30_000)
        tab.goto(url)
        tab.wait_for_function("document.getElementById('model').textContent.includes('tiny_run')")
        yield tab, url, pool
        browser.close()


def say(tab, text):
    "Type `text` into the input box and press Enter; wait until the page is idle again."
    tab.fill("#input", text)
    tab.press("#input", "Enter")
    tab.wait_for_function(IDLE)


def bubbles(tab):
    return tab.eval_on_selector_all(".msg", "els => els.map(e => [e.classList[1], e.textContent])")


def test_send_stream_regenerate_edit_stop_and_new(page):
    tab, url, pool = page
    say(tab, "/max_tokens 300")  # slash commands set the sampling, and say so
    assert tab.text_content("#status") == "max_tokens = 300" and bubbles(tab) == []
    say(tab, "/temperature 0")  # greedy: this model runs on to max_tokens, long enough to watch it stream

    tab.evaluate(WATCH)
    say(tab, "Hello there")
    tab.wait_for_function("document.querySelectorAll('.msg').length === 2 && " + IDLE)
    (role1, text1), (role2, answer) = bubbles(tab)
    assert (role1, text1) == ("user", "Hello there") and role2 == "assistant" and answer
    seen = tab.evaluate("window.seen")
    assert len(seen) >= 3 and seen[-1] == answer, seen  # the answer grew piece by piece
    assert all(b.startswith(a) for a, b in zip(seen, seen[1:]))

    say(tab, "/temperature 0.8")
    say(tab, "/max_tokens 48")
    requests = httpx.get(url + "/stats").json()["workers"][0]["requests"]
    tab.click(".msg.assistant")  # click an answer: regenerate it
    tab.wait_for_function(f"document.querySelectorAll('.msg').length === 2 && {IDLE} && "
                          f"document.querySelector('.msg.assistant').textContent !== {answer!r}")
    assert httpx.get(url + "/stats").json()["workers"][0]["requests"] == requests + 1
    assert bubbles(tab)[0] == ["user", "Hello there"]

    tab.click(".msg.user")  # click your message: edit it
    assert tab.input_value("#input") == "Hello there" and bubbles(tab) == []
    say(tab, "Second try")
    tab.wait_for_function("document.querySelectorAll('.msg').length === 2")
    assert bubbles(tab)[0] == ["user", "Second try"]

    say(tab, "/temperature 0")
    say(tab, "/max_tokens 4096")  # the server cuts it to the room the model has: about 2,500 tokens
    tokens = pool.workers[0].tokens
    tab.fill("#input", "Go on forever.")
    tab.press("#input", "Enter")
    tab.wait_for_function("document.querySelectorAll('.msg').length === 4 && "
                          "document.querySelector('.msg.streaming').textContent.length > 5")
    tab.click("#stop")
    tab.wait_for_function(IDLE)
    partial = bubbles(tab)[-1]
    assert partial[0] == "assistant" and partial[1]
    for _ in range(200):  # the page hung up: the server stops and the worker is free again
        if httpx.get(url + "/stats").json()["available_workers"] == 1:
            break
        tab.wait_for_timeout(10)
    assert httpx.get(url + "/stats").json()["available_workers"] == 1
    assert pool.workers[0].tokens - tokens < 1000

    tab.click("#new")
    assert bubbles(tab) == [] and tab.text_content("#status") == "New conversation."


def test_errors_and_tool_parts(page):
    tab, url, pool = page
    say(tab, "/temperature 7")
    assert "from 0 to 2" in tab.text_content("#status") and tab.get_attribute("#status", "class") == "error"
    say(tab, "/max_tokens 8")
    say(tab, "y" * 9000)  # too long for the server: its 400 message is shown, the message stays to be edited
    assert "8,000" in tab.text_content("#status") and tab.get_attribute("#status", "class") == "error"
    assert bubbles(tab) == [["user", "y" * 9000]]
    tab.click("#new")

    spans = tab.evaluate("""() => {
      const div = document.createElement('div');
      renderParts(div, 'Let me see. <|python_start|>12*7<|python_end|><|output_start|>84<|output_end|> So 84.');
      return [...div.children].map(s => [s.className, s.textContent]);
    }""")
    assert spans == [["text", "Let me see. "], ["tool-call", "12*7"], ["tool-result", "84"], ["text", " So 84."]]
    html = tab.evaluate("() => { const d = document.createElement('div'); renderParts(d, '<b>x</b>'); "
                        "return d.innerHTML; }")
    assert html == '<span class="text">&lt;b&gt;x&lt;/b&gt;</span>'  # model text is never parsed as HTML
