"""End to end: `dpolab app` serving a tiny model, driven by a real headless browser (Debian's Chromium via Playwright).

Needs /usr/bin/chromium (`make setup` installs it as root) and the `playwright` package; Playwright's own browser
downloads are never used. Without Chromium these tests skip, except under CI (`CI` set), where they fail.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from dpolab.generation import GenerationSettings, build_prompt, generate_text
from tests.conftest import missing

CHROMIUM = Path("/usr/bin/chromium")
# As root Chromium needs --no-sandbox; without the background-networking flags it opens connections (updates,
# sync, QUIC probes) that get refused many at a time on an offline machine. Playwright adds --headless and a fresh
# temporary --user-data-dir itself.
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
CHAT_INPUT = '[data-testid="stChatInputTextArea"]'
STOP_BUTTON = '[data-testid="stChatInputStopButton"]'  # the chat input's send button while an answer streams
# The answer text of the last assistant message ('' before there is one): its Markdown, without the captions (place
# in line, timing, "stopped"), the column labels of compare mode, the Stop button's label and the avatar's icon name.
# With `side` ('tuned' or 'base'), only that column while it streams.
ANSWER_TEXT_JS = """(side) => {
  const answers = [...document.querySelectorAll('[data-testid="stChatMessage"]')]
    .filter(m => m.querySelector('[data-testid="stChatMessageAvatarAssistant"]'));
  if (!answers.length) return '';
  let root = answers[answers.length - 1].querySelector('[data-testid="stChatMessageContent"]');
  if (side) root = root.querySelector('.st-key-live-' + side);
  if (!root) return '';
  return [...root.querySelectorAll('[data-testid="stMarkdownContainer"]')]
    .filter(e => !e.closest('[data-testid="stCaptionContainer"]') && !e.closest('[data-testid="stButton"]'))
    .map(e => e.innerText).filter(t => !/^(DPO-tuned|Base) · /.test(t)).join('\\n');
}"""
LAST_ANSWER_JS = "() => (" + ANSWER_TEXT_JS + ")(null)"
# The whole bubble of the last assistant message as shown (captions included).
LAST_BUBBLE_JS = """() => {
  const answers = [...document.querySelectorAll('[data-testid="stChatMessage"]')]
    .filter(m => m.querySelector('[data-testid="stChatMessageAvatarAssistant"]'));
  return answers.length ? answers[answers.length - 1].querySelector('[data-testid="stChatMessageContent"]').innerText
                        : null;
}"""
# At every DOM change, record the time and the answer's length (per column with sides), and the bubble's text:
# streaming shows as many distinct lengths, one block as one.
RECORD_JS = """(sides) => {
  window.__log = [];
  const text = """ + ANSWER_TEXT_JS + """;
  const bubble = """ + LAST_BUBBLE_JS + """;
  new MutationObserver(() => {
    window.__log.push({t: Date.now(), n: sides.map(side => text(side).length), bubble: bubble()});
  }).observe(document.body, {subtree: true, childList: true, characterData: true});
}"""
IDLE = '[data-testid="stApp"][data-test-script-state="notRunning"]'  # Streamlit's own marker for tests
LONG, SHORT = 400, 120  # max new tokens: long enough to watch it stream (~1-2 s), short for the concurrency test


@contextlib.contextmanager
def one_torch_thread():
    """Tiny models gain nothing from a second thread, and two-thread torch crawls when another process holds a core."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def words(text: str) -> list[str]:
    """Letters and digits only: the page renders answers as Markdown (the tiny model's word salad may hold * or ~)."""
    return re.findall(r"[^\W_]+", text)


def require_browser():
    problem = None
    if not CHROMIUM.exists():
        problem = f"{CHROMIUM} is missing (as root: apt-get install chromium, or `make setup`)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            problem = "the playwright package is missing (pip install -e '.[test]')"
    if problem:
        missing(problem)


@pytest.fixture(scope="module")
def browser():
    require_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def chatty_model(chatty_llama) -> Path:
    return chatty_llama


@pytest.fixture(scope="module")
def expected(chatty_model):
    from dpolab.models import load_model, load_tokenizer

    model, tokenizer = load_model(str(chatty_model)), load_tokenizer(str(chatty_model))

    @functools.cache
    def answer(question: str, max_new_tokens: int) -> str:
        prompt = build_prompt(question, "qa", tokenizer)
        with one_torch_thread():
            return generate_text(model, tokenizer, prompt, "qa", GenerationSettings(greedy=True, max_new_tokens=max_new_tokens))

    return answer


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serve(tmp_path_factory, *args: str):
    """`dpolab app ARGS` on a free port, until the block ends; yields its URL."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("app") / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "dpolab", "app", *args, "--port", str(port)],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})  # see one_torch_thread
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the app did not come up:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.2)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # our own process group: the server and nothing else
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def server(browser, chatty_model, tmp_path_factory):
    """Two answers at once at most: a third person waits in line."""
    with serve(tmp_path_factory, str(chatty_model), "--max-batch", "2") as url:
        yield url


@pytest.fixture(scope="module")
def compare_server(browser, chatty_model, tiny_gpt2, tmp_path_factory):
    with serve(tmp_path_factory, str(chatty_model), "--compare", str(tiny_gpt2)) as url:
        yield url


REQUESTS: list[str] = []  # every URL any page of these tests asked for


def open_chat(browser, url: str, max_new_tokens: int, greedy: bool = True):
    from playwright.sync_api import expect

    page = browser.new_context(viewport={"width": 1280, "height": 860}).new_page()
    page.set_default_timeout(60_000)
    page.on("request", lambda request: REQUESTS.append(request.url))
    page.goto(url)
    page.locator(CHAT_INPUT).wait_for()
    if greedy:
        page.get_by_text("Greedy (deterministic)").click()  # the switch itself is visually hidden; its label is not
        expect(page.get_by_role("switch", name="Greedy (deterministic)")).to_be_checked()
    set_max_new_tokens(page, max_new_tokens)
    return page


def wait_idle(page, quiet: float = 0.3) -> None:
    """Until no script run is going on for `quiet` s (a widget change starts its rerun a moment after the click).

    A message sent while an earlier run is still finishing works, but the chat input then shows its send button
    instead of the Stop button, which the stop test needs."""
    deadline, since = time.monotonic() + 60, None
    while time.monotonic() < deadline:
        if page.locator(IDLE).count():
            since = since or time.monotonic()
            if time.monotonic() - since >= quiet:
                return
        else:
            since = None
        time.sleep(0.03)
    raise AssertionError("the app did not become idle")


def set_max_new_tokens(page, n: int) -> None:
    from playwright.sync_api import expect

    tokens = page.get_by_label("Max new tokens")
    tokens.fill(str(n))
    tokens.press("Enter")
    expect(tokens).to_have_value(str(n))


def send(page, text: str, wait: bool = True) -> None:
    if wait:
        wait_idle(page)
    page.locator(CHAT_INPUT).fill(text)
    page.locator(CHAT_INPUT).press("Enter")


def wait_for_answer(page, want: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = page.evaluate(LAST_ANSWER_JS)
        if words(text) == words(want) or time.monotonic() > deadline:
            return text
        time.sleep(0.05)


def record(page, sides=(None,)) -> None:
    page.evaluate(RECORD_JS, list(sides))


def log(page) -> list[dict]:
    return page.evaluate("window.__log")


def streaming(entries: list[dict], column: int = 0) -> list[tuple[int, int]]:
    """(time, length) at each change of the answer's length, from its first text on."""
    out, last = [], 0
    for entry in entries:
        n = entry["n"][column]
        if n != last and n > 0:
            out.append((entry["t"], n))
        last = n
    return out


def test_answer_streams_into_the_page(browser, server, expected, tmp_path):
    question = "What is the purpose of life?"
    want = expected(question, LONG)
    page = open_chat(browser, server, LONG)
    record(page)
    send(page, question)
    text = wait_for_answer(page, want)
    assert words(text) == words(want) and len(words(want)) > 50
    growing = streaming(log(page))
    assert len(growing) >= 3, f"the answer arrived in {len(growing)} step(s), not streamed: {growing}"
    # An answer cut by the token limit says so.
    expect_caption(page, f"cut at the limit of {LONG} new tokens")
    shot = tmp_path / "chat.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    page.context.close()


def expect_caption(page, text: str) -> None:
    from playwright.sync_api import expect

    answers = page.locator('[data-testid="stChatMessage"]').filter(
        has=page.locator('[data-testid="stChatMessageAvatarAssistant"]'))
    expect(answers.last.locator('[data-testid="stCaptionContainer"]').filter(has_text=text)).to_have_count(1)


def test_two_users_stream_at_once_and_a_third_waits_in_line(browser, server, expected):
    """The server batches at most two answers (--max-batch 2): two people stream together, a third sees its place."""
    questions = ["How to live a healthy life?", "Tell me a joke.", "What is the purpose of life?"]
    wants = [expected(q, LONG) for q in questions]
    assert words(wants[0]) != words(wants[1])
    pages = [open_chat(browser, server, LONG) for _ in questions]
    for page in pages:
        wait_idle(page)
        record(page)
    for page, question in zip(pages[:2], questions):
        send(page, question, wait=False)
    time.sleep(0.5)
    send(pages[2], questions[2], wait=False)
    for page, want in zip(pages, wants):
        assert words(wait_for_answer(page, want)) == words(want)
    a, b, c = (log(page) for page in pages)
    sa, sb = streaming(a), streaming(b)
    assert abs(sa[0][0] - sb[0][0]) <= 2000, f"first text {abs(sa[0][0] - sb[0][0])} ms apart"
    # Each streamed while the other was still streaming.
    assert sum(t < sb[-1][0] for t, _ in sa) >= 10 and sum(t < sa[-1][0] for t, _ in sb) >= 10, (len(sa), len(sb))
    # The third: never an empty bubble; its place in line until its text comes.
    bubbles = [entry["bubble"] for entry in c if entry["bubble"] is not None]
    first_text = next(i for i, entry in enumerate(c) if entry["n"][0] > 0)
    waiting = [entry["bubble"] for entry in c[:first_text] if entry["bubble"] is not None]
    assert bubbles and all(text.strip() for text in bubbles)
    assert any("1st in line" in text for text in waiting), waiting[-3:]
    for page in pages:
        page.context.close()


def test_stop_button_ends_the_answer_at_once_and_the_chat_goes_on(browser, server, expected, tokenizer):
    from playwright.sync_api import expect

    page = open_chat(browser, server, 1000)
    send(page, "What is the purpose of life?")
    deadline = time.monotonic() + 60
    while not words(page.evaluate(LAST_ANSWER_JS)) and time.monotonic() < deadline:
        time.sleep(0.02)
    # Clicked and watched inside the page: the time from the click to the answer shown as stopped, without cursor.
    page.evaluate("""() => {
      const bubble = """ + LAST_BUBBLE_JS + """;
      new MutationObserver(() => {
        const text = bubble() || '';
        if (window.__stoppedAt === undefined && text.includes('stopped') && !text.includes('▌'))
          window.__stoppedAt = Date.now();
      }).observe(document.body, {subtree: true, childList: true, characterData: true});
      window.__clickedAt = Date.now();
      [...document.querySelectorAll('button')].find(b => b.innerText.trim().endsWith('Stop')).click();
    }""")
    page.wait_for_function("window.__stoppedAt !== undefined", timeout=10_000)
    delay = page.evaluate("window.__stoppedAt - window.__clickedAt")
    assert delay <= 500, f"'stopped' shown {delay} ms after the click"
    expect(page.locator(CHAT_INPUT)).to_be_enabled()  # the run is over
    partial = page.evaluate(LAST_ANSWER_JS)
    time.sleep(1.0)
    assert page.evaluate(LAST_ANSWER_JS) == partial  # nothing more arrives
    assert 0 < len(tokenizer(partial).input_ids) < 500  # well short of the 1,000 tokens asked for

    # The stopped answer stays in the conversation, marked as such...
    set_max_new_tokens(page, SHORT)
    expect(page.locator('[data-testid="stChatMessage"]').nth(1)).to_contain_text("stopped")
    # ...and the model is free again: after Clear chat, a new question gets its whole answer.
    page.get_by_role("button", name="Clear chat").click()
    expect(page.locator('[data-testid="stChatMessage"]')).to_have_count(0)
    want = expected("Tell me a joke.", SHORT)
    send(page, "Tell me a joke.")
    assert words(wait_for_answer(page, want)) == words(want)
    page.context.close()


def test_compare_mode_streams_both_columns_at_once(browser, compare_server):
    """Sampled (the default), two models: both columns show text before either finishes, each with its timing."""
    page = open_chat(browser, compare_server, LONG, greedy=False)
    record(page, ("tuned", "base"))
    send(page, "What is the purpose of life?")
    wait_idle(page, quiet=0.5)
    entries = log(page)
    tuned, base = streaming(entries, 0), streaming(entries, 1)
    assert tuned and base, (len(tuned), len(base))
    finished = min(tuned[-1][0], base[-1][0])
    assert tuned[0][0] < finished and base[0][0] < finished, "one column waited for the other"
    columns = page.locator('[data-testid="stChatMessage"]').last.locator('[data-testid="stColumn"]')
    for i in range(2):
        assert "tokens/s" in columns.nth(i).inner_text()
    page.context.close()


def test_the_page_asks_nothing_of_any_host_but_this_one(browser, server, expected):
    page = open_chat(browser, server, SHORT)
    send(page, "Hello")
    wait_for_answer(page, expected("Hello", SHORT))
    loaded = page.evaluate("performance.getEntriesByType('resource').map(e => e.name)")
    icons = page.evaluate("[...document.querySelectorAll('link[rel*=icon]')].map(l => l.href)")
    page.context.close()
    urls = REQUESTS + loaded + icons  # every request of every page these tests opened
    assert len(REQUESTS) > 10 and icons
    from urllib.parse import urlparse

    outside = sorted({u for u in urls if urlparse(u).scheme in ("http", "https", "ws", "wss")
                      and urlparse(u).hostname != "127.0.0.1"})
    assert not outside, outside
