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

CHROMIUM = Path("/usr/bin/chromium")
# As root Chromium needs --no-sandbox; without the background-networking flags it opens connections (updates,
# sync, QUIC probes) that get refused many at a time on an offline machine. Playwright adds --headless and a fresh
# temporary --user-data-dir itself.
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
CHAT_INPUT = '[data-testid="stChatInputTextArea"]'
STOP_BUTTON = '[data-testid="stChatInputStopButton"]'  # the chat input's send button while an answer streams
# The text of the last assistant message ('' before there is one), without its avatar's icon name.
LAST_ANSWER_JS = """() => {
  const answers = [...document.querySelectorAll('[data-testid="stChatMessage"]')]
    .filter(m => m.querySelector('[data-testid="stChatMessageAvatarAssistant"]'));
  if (!answers.length) return '';
  return answers[answers.length - 1].querySelector('[data-testid="stChatMessageContent"]').innerText;
}"""
# Record the last answer's length at every DOM change: streaming shows as many distinct lengths, one block as one.
RECORD_LENGTHS_JS = """() => {
  window.__lengths = []; window.__changed = [];
  const read = """ + LAST_ANSWER_JS + """;
  new MutationObserver(() => { window.__lengths.push(read().length); window.__changed.push(Date.now()); })
    .observe(document.body, {subtree: true, childList: true, characterData: true});
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
        if os.environ.get("CI"):
            pytest.fail(problem)
        pytest.skip(problem)


@pytest.fixture(scope="module")
def browser():
    require_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def chatty_model(tmp_path_factory, tokenizer) -> Path:
    """A tiny Llama whose weights are drawn wider than usual: greedy decoding then gives a different word salad per
    prompt (the default init repeats one token), so a mixed-up or cut answer cannot pass for the right one."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         initializer_range=0.3, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    path = tmp_path_factory.mktemp("chatty-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


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


@pytest.fixture(scope="module")
def server(browser, chatty_model, tmp_path_factory):
    port = free_port()
    log_path = tmp_path_factory.mktemp("app") / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "dpolab", "app", str(chatty_model), "--port", str(port)],
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


def open_chat(browser, url: str, max_new_tokens: int):
    from playwright.sync_api import expect

    page = browser.new_context(viewport={"width": 1280, "height": 860}).new_page()
    page.set_default_timeout(60_000)
    page.goto(url)
    page.locator(CHAT_INPUT).wait_for()
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


def test_answer_streams_into_the_page(browser, server, expected, tmp_path):
    question = "What is the purpose of life?"
    want = expected(question, LONG)
    page = open_chat(browser, server, LONG)
    page.evaluate(RECORD_LENGTHS_JS)
    send(page, question)
    text = wait_for_answer(page, want)
    assert words(text) == words(want) and len(words(want)) > 50
    lengths = page.evaluate("window.__lengths")
    growing = sorted({n for n in lengths if n > 0})
    assert len(growing) >= 3, f"the answer arrived in {len(growing)} step(s), not streamed: {growing}"
    shot = tmp_path / "chat.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    page.context.close()


def test_two_users_at_once_each_get_their_whole_answer(browser, server, expected):
    questions = ["How to live a healthy life?", "Tell me a joke."]
    wants = [expected(q, LONG) for q in questions]
    assert words(wants[0]) != words(wants[1])
    pages = [open_chat(browser, server, LONG) for _ in questions]
    for page in pages:
        wait_idle(page)
        page.evaluate(RECORD_LENGTHS_JS)
    for page, question in zip(pages, questions):
        send(page, question, wait=False)
    second_sent = pages[1].evaluate("Date.now()")
    for page, want in zip(pages, wants):
        assert words(wait_for_answer(page, want)) == words(want)
    # The second question went out while the first answer was still streaming: the two really overlapped.
    changes = list(zip(pages[0].evaluate("window.__changed"), pages[0].evaluate("window.__lengths")))
    first_answer_done = max(t for (t, n), (_, before) in zip(changes[1:], changes) if n != before)
    assert second_sent < first_answer_done
    for page in pages:
        page.context.close()


def test_stop_button_ends_the_answer_and_the_chat_goes_on(browser, server, expected, tokenizer):
    from playwright.sync_api import expect

    page = open_chat(browser, server, 1000)
    send(page, "What is the purpose of life?")
    deadline = time.monotonic() + 60
    while not words(page.evaluate(LAST_ANSWER_JS)) and time.monotonic() < deadline:
        time.sleep(0.02)
    page.locator(STOP_BUTTON).click()
    expect(page.locator(CHAT_INPUT)).to_be_enabled()  # the run is over
    partial = page.evaluate(LAST_ANSWER_JS)
    time.sleep(1.0)
    assert page.evaluate(LAST_ANSWER_JS) == partial  # nothing more arrives
    assert 0 < len(tokenizer(partial).input_ids) < 500  # well short of the 1,000 tokens asked for

    # The stopped answer stays in the conversation, marked as such (shown on the next run)...
    set_max_new_tokens(page, SHORT)
    expect(page.locator('[data-testid="stChatMessage"]').nth(1)).to_contain_text("stopped")
    # ...and the model is free again: after Clear chat, a new question gets its whole answer.
    page.get_by_role("button", name="Clear chat").click()
    expect(page.locator('[data-testid="stChatMessage"]')).to_have_count(0)
    want = expected("Tell me a joke.", SHORT)
    send(page, "Tell me a joke.")
    assert words(wait_for_answer(page, want)) == words(want)
    page.context.close()
