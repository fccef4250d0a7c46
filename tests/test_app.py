"""The chat app's logic, run headless by Streamlit's AppTest (no server, no browser) on tiny local models."""

from __future__ import annotations

import sys
import threading

import pytest

st = pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

from dpolab import EMBEDDED_MODEL  # noqa: E402
from dpolab.app.launch import PAGE, page_args, streamlit_command  # noqa: E402
from dpolab.generation import GenerationSettings, build_prompt, generate_text, stream_text  # noqa: E402
from dpolab.models import load_model, load_tokenizer  # noqa: E402

QUESTION = "What is the purpose of life?"
# The page's defaults with the greedy toggle on, and short answers: the tiny model's text is gibberish anyway.
GREEDY = GenerationSettings(greedy=True, max_new_tokens=48)
SAMPLED = GenerationSettings(max_new_tokens=48)


@pytest.fixture(autouse=True)
def fresh_cache():
    st.cache_resource.clear()  # each test loads its models anew: no state leaks between tests
    yield
    st.cache_resource.clear()


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from a second thread, and two-thread torch crawls when another process holds a core."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def open_page(monkeypatch):
    """An AppTest of the page with `args` as Streamlit would pass them (sys.argv = [page, *args])."""

    def make(*args: str, greedy: bool = True) -> AppTest:
        monkeypatch.setattr(sys, "argv", [str(PAGE), *map(str, args)])
        at = AppTest.from_file(str(PAGE), default_timeout=60)
        at.run()
        assert not at.exception, at.exception
        at.number_input(key="max_new_tokens").set_value(GREEDY.max_new_tokens)
        at.toggle(key="greedy").set_value(greedy).run()
        return at

    return make


@pytest.fixture(scope="module")
def expected(tiny_llama):
    """What generate_text answers (the ground truth the streamed page text must equal)."""
    cache: dict = {}

    def answer(prompt_text: str, history=(), folder=None, settings=GREEDY) -> str:
        folder = folder or tiny_llama
        if folder not in cache:
            cache[folder] = (load_model(str(folder)), load_tokenizer(str(folder)))
        model, tokenizer = cache[folder]
        prompt = build_prompt(prompt_text, "qa", tokenizer, history)
        # As displayed: st.markdown drops leading/trailing whitespace.
        return generate_text(model, tokenizer, prompt, "qa", settings).strip()

    return answer


def chat(at: AppTest, text: str) -> AppTest:
    at.chat_input(key="prompt").set_value(text).run()
    assert not at.exception, at.exception
    return at


def texts(message) -> list[str]:
    return [md.value for md in message.markdown]


def test_chat_streams_the_answer_generate_text_gives(open_page, tiny_llama, expected):
    at = chat(open_page(tiny_llama), QUESTION)
    user, assistant = at.chat_message
    assert (user.name, assistant.name) == ("user", "assistant")
    assert texts(user) == [QUESTION]
    answer = expected(QUESTION)
    assert answer.strip() and texts(assistant) == [answer]
    assert any("template `qa`" in md.value for md in at.markdown)  # the page says which model and template

    # A second turn is formatted with the first one as history, exactly as build_prompt does in training.
    chat(at, "And why?")
    assert len(at.chat_message) == 4
    assert texts(at.chat_message[3]) == [expected("And why?", [("user", QUESTION), ("assistant", answer)])]
    assert not at.error and not at.warning


def test_example_button_and_clear_chat(open_page, tiny_llama, expected):
    at = open_page(tiny_llama)
    labels = [b.label for b in at.button]
    assert "What is the purpose of life?" in labels and "How to live a healthy life?" in labels
    at.button(key="example-How to live a healthy life?").click().run()
    assert [m.name for m in at.chat_message] == ["user", "assistant"]
    assert texts(at.chat_message[1]) == [expected("How to live a healthy life?")]
    at.button(key="clear").click().run()
    assert len(at.chat_message) == 0 and at.session_state.messages == []


def test_compare_mode_answers_side_by_side(open_page, tiny_llama, tiny_gpt2, expected):
    at = chat(open_page(tiny_llama, "--compare", tiny_gpt2), QUESTION)
    assistant = at.chat_message[1]
    assert len(assistant.columns) == 2
    tuned, base = (texts(column) for column in assistant.columns)
    assert tuned[0].startswith("**DPO-tuned") and base[0].startswith("**Base")
    assert tuned[1:] == [expected(QUESTION)] and base[1:] == [expected(QUESTION, folder=tiny_gpt2)]
    assert tuned[1] != base[1]
    assert at.checkbox(key="compare").value and at.text_input(key="base_name").value == str(tiny_gpt2)


def test_compare_mode_samples_reproducibly(open_page, tiny_llama, tiny_gpt2, expected):
    # Sampled, two models at once: each answer is the one its seed gives alone (they take turns on the global RNG).
    at = chat(open_page(tiny_llama, "--compare", tiny_gpt2, greedy=False), QUESTION)
    tuned, base = (texts(column)[1] for column in at.chat_message[1].columns)
    assert tuned == expected(QUESTION, settings=SAMPLED)
    assert base == expected(QUESTION, folder=tiny_gpt2, settings=SAMPLED)


def test_an_interrupted_answer_stops_generation_and_keeps_what_was_shown(open_page, tiny_llama, monkeypatch):
    # Stop button, a new message, a closed tab: Streamlit raises StopException/RerunException in the script thread
    # while it streams. The page must then set the stop Event handed to stream_text, and keep the partial answer.
    from streamlit.runtime.scriptrunner_utils.exceptions import StopException

    import dpolab.generation

    handed: dict = {}

    def interrupted_stream(model, tokenizer, prompt, template, settings, stop=None, lock=None):
        handed.update(stop=stop, lock=lock)

        def pieces():
            yield "The start "
            yield "of an answer"
            raise StopException()

        return pieces(), False

    at = open_page(tiny_llama)
    monkeypatch.setattr(dpolab.generation, "stream_text", interrupted_stream)  # the page imports it on each run
    chat(at, QUESTION)
    assert handed["stop"].is_set() and handed["lock"] is not None
    assert at.session_state.messages[-1] == {"role": "assistant", "tuned": "The start of an answer", "stopped": True}
    at.run()
    assert any("stopped" in c.value for c in at.chat_message[1].caption)


def test_missing_model_folder_says_what_to_do(open_page, tmp_path):
    at = open_page(tmp_path / "no-such-run", greedy=False)
    assert len(at.error) == 1
    message = at.error[0].value
    assert "no folder `no-such-run`" in message and "make demo" in message
    assert not at.chat_message


def test_folder_without_a_model_is_explained(open_page, tmp_path):
    (tmp_path / "empty-run").mkdir()
    at = open_page(tmp_path / "empty-run", greedy=False)
    assert len(at.error) == 1 and "not a model folder" in at.error[0].value and "make demo" in at.error[0].value


def test_missing_base_model_is_explained_and_the_chat_still_works(open_page, tiny_llama, tmp_path):
    at = open_page(tiny_llama, "--compare", tmp_path / "no-base", greedy=False)
    assert len(at.error) == 1 and "Cannot load the base model" in at.error[0].value
    assert at.chat_input(key="prompt") is not None  # the tuned model alone still answers


def test_blank_prompt_is_ignored(open_page, tiny_llama):
    at = chat(open_page(tiny_llama), "   \n ")
    assert not at.chat_message and not at.error and at.session_state.messages == []


def test_overlong_prompt_is_cut_from_the_start_with_a_notice(open_page, tiny_llama, expected):
    long_prompt = "Tell me about this: " + "history " * 1200  # > the tiny model's 1024-token context
    at = chat(open_page(tiny_llama), long_prompt)
    assert len(at.warning) == 1 and "left out" in at.warning[0].value
    answer = texts(at.chat_message[1])
    assert answer == [expected(long_prompt)]  # generate_text truncates the same way
    at.run()  # on the next run the history keeps a mark of the truncation
    assert any("left out" in c.value for c in at.chat_message[1].caption)


def test_without_a_model_the_sidebar_offers_runs_and_the_embedded_model(open_page, tmp_path, tiny_llama):
    runs = tmp_path / "runs"
    (runs / "demo").mkdir(parents=True)
    (runs / "demo" / "model").symlink_to(tiny_llama)  # a run folder: model/config.json
    (runs / "sweep" / "best").mkdir(parents=True)
    (runs / "sweep" / "best" / "model").symlink_to(tiny_llama)  # a sweep folder: best/model/config.json
    (runs / "demo-data").mkdir()  # prepared data, not a model: not offered
    at = open_page("--runs-dir", runs, greedy=False)
    options = at.selectbox(key="model_choice").options
    assert sorted(options[:2]) == sorted([str(runs / "demo"), str(runs / "sweep")]) and options[2] == EMBEDDED_MODEL
    assert not at.error


def test_shared_model_lock_gives_each_concurrent_caller_its_whole_answer(tiny_llama, expected):
    model, tokenizer = load_model(str(tiny_llama)), load_tokenizer(str(tiny_llama))
    lock = threading.Lock()
    questions = [QUESTION, "How to live a healthy life?", "Hello"]
    results: dict[str, str] = {}

    def user(question: str) -> None:
        pieces, _ = stream_text(model, tokenizer, build_prompt(question, "qa", tokenizer), "qa", GREEDY, lock=lock)
        results[question] = "".join(pieces).strip()

    threads = [threading.Thread(target=user, args=(q,)) for q in questions]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert results == {q: expected(q) for q in questions}


def test_stop_event_ends_generation_and_frees_the_model(tiny_llama):
    model, tokenizer = load_model(str(tiny_llama)), load_tokenizer(str(tiny_llama))
    lock, stop = threading.Lock(), threading.Event()
    settings = GenerationSettings(greedy=True, max_new_tokens=1000)
    pieces, _ = stream_text(model, tokenizer, build_prompt("Hi", "qa", tokenizer), "qa", settings, stop=stop, lock=lock)
    first = next(pieces)
    stop.set()  # what the page does when a run is interrupted (Stop button, new message, closed tab)
    rest = "".join(pieces)
    assert len(tokenizer(first + rest).input_ids) < 200
    assert lock.acquire(timeout=10)  # the model is free for the next user


def test_launch_command_passes_the_page_its_options():
    cmd = streamlit_command("runs/demo", compare="base-folder", port=8600, host="0.0.0.0", runs_dir="my-runs")
    assert cmd[1:5] == ["-m", "streamlit", "run", str(PAGE)]
    flags = dict(zip(cmd[5 : cmd.index("--") : 2], cmd[6 : cmd.index("--") : 2]))
    assert flags["--server.headless"] == "true" and flags["--browser.gatherUsageStats"] == "false"
    assert flags["--server.port"] == "8600" and flags["--server.address"] == "0.0.0.0"
    assert cmd[cmd.index("--") + 1 :] == page_args("runs/demo", "base-folder", "my-runs")
    # The page reads back exactly what the launcher passed; anyone else's argv (pytest's) is not parsed.
    from dpolab.app.page import parse_page_args

    args = parse_page_args([str(PAGE), *page_args("runs/demo", "base-folder", "my-runs")])
    assert (args.model, args.compare, args.runs_dir) == ("runs/demo", "base-folder", "my-runs")
    assert parse_page_args(["pytest", "-q", "tests"]).model is None


def test_cli_help_describes_the_app():
    from typer.testing import CliRunner

    from dpolab.cli import app

    result = CliRunner().invoke(app, ["app", "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    for option in ("--compare", "--port", "--host", "--runs-dir", "MODEL"):
        assert option in result.output
