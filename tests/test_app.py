"""The chat app's logic, run headless by Streamlit's AppTest (no server, no browser) on tiny local models."""

from __future__ import annotations

import sys

import pytest

st = pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

from dpolab import EMBEDDED_MODEL  # noqa: E402
from dpolab.app.launch import PAGE, STUDIO, page_args, streamlit_command  # noqa: E402
from dpolab.generation import GenerationSettings, build_prompt, generate_text  # noqa: E402
from dpolab.models import load_model, load_tokenizer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
QUESTION = "What is the purpose of life?"
# The page's defaults with the greedy toggle on, and short answers: the tiny model's text is gibberish anyway.
GREEDY = GenerationSettings(greedy=True, max_new_tokens=48)
SAMPLED = GenerationSettings(max_new_tokens=48)


@pytest.fixture(autouse=True)
def fresh_cache():
    st.cache_resource.clear()  # each test loads its models anew: no state leaks between tests
    yield
    st.cache_resource.clear()


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
    assert at.checkbox(key="compare").value and at.selectbox(key="base_name").value == str(tiny_gpt2)


def test_compare_mode_samples_reproducibly(open_page, tiny_llama, tiny_gpt2, expected):
    # Sampled, two models at once: each answer is the one its seed gives alone (each request has its own generator).
    at = chat(open_page(tiny_llama, "--compare", tiny_gpt2, greedy=False), QUESTION)
    tuned, base = (texts(column)[1] for column in at.chat_message[1].columns)
    assert tuned == expected(QUESTION, settings=SAMPLED)
    assert base == expected(QUESTION, folder=tiny_gpt2, settings=SAMPLED)


class Interrupted:
    """An event queue that gives two pieces of text, then raises what Streamlit raises in the script thread when the
    user clicks Stop (or the run is otherwise ended) while the answer streams."""

    def __init__(self):
        from dpolab.serving import Text

        self.items = [Text("The start "), Text("of an answer")]

    def put(self, event):  # what the engine still sends is not shown
        pass

    def get_nowait(self):
        from streamlit.runtime.scriptrunner_utils.exceptions import StopException

        if not self.items:
            raise StopException()
        return self.items.pop(0)


def test_an_interrupted_answer_stops_generation_and_keeps_what_was_shown(open_page, tiny_llama, monkeypatch):
    from dpolab.serving import DecodeEngine

    handed: dict = {}
    submit = DecodeEngine.submit

    def interrupted_submit(self, prompt, template, settings, stop=None, min_new_tokens=0):
        handed["stop"] = stop
        request = submit(self, prompt, template, settings, stop)  # a real request, its events replaced
        request.events = Interrupted()
        return request

    at = open_page(tiny_llama)
    monkeypatch.setattr(DecodeEngine, "submit", interrupted_submit)
    chat(at, QUESTION)
    assert handed["stop"].is_set()  # the engine is told to stop working on the answer
    reply = at.session_state.messages[-1]
    assert reply["tuned"] == "The start of an answer" and reply["stopped"]
    assert reply["ends"]["tuned"]["reason"] == "stopped"
    at.run()
    assert texts(at.chat_message[1]) == ["The start of an answer"]
    assert any("stopped" in c.value for c in at.chat_message[1].caption)


def test_an_answer_cut_by_the_token_limit_says_so(open_page, tiny_llama):
    at = open_page(tiny_llama)
    at.number_input(key="max_new_tokens").set_value(3).run()
    chat(at, QUESTION)
    assert at.session_state.messages[-1]["ends"]["tuned"]["reason"] == "length"
    assert any("cut at the limit of 3 new tokens" in c.value for c in at.chat_message[1].caption)


def test_a_failed_generation_shows_in_the_bubble(open_page, tiny_llama, monkeypatch):
    from dpolab.serving import DecodeEngine

    def broken(self, request, logits):
        raise RuntimeError("the model broke (simulated)")

    at = open_page(tiny_llama)
    monkeypatch.setattr(DecodeEngine, "_choose", broken)
    chat(at, QUESTION)
    bubble = at.chat_message[1]
    assert len(bubble.error) == 1 and "the model broke (simulated)" in bubble.error[0].value
    assert at.session_state.messages[-1]["ends"]["tuned"]["reason"] == "error"


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


def test_launch_command_passes_the_page_its_options():
    cmd = streamlit_command("runs/demo", compare="base-folder", port=8600, host="0.0.0.0", runs_dir="my-runs",
                            max_batch=2)
    assert cmd[1:5] == ["-m", "streamlit", "run", str(STUDIO)]
    flags = dict(zip(cmd[5 : cmd.index("--") : 2], cmd[6 : cmd.index("--") : 2]))
    assert flags["--server.headless"] == "true" and flags["--browser.gatherUsageStats"] == "false"
    assert flags["--server.port"] == "8600" and flags["--server.address"] == "0.0.0.0"
    assert cmd[cmd.index("--") + 1 :] == page_args("runs/demo", "base-folder", "my-runs", 2)
    # The page reads back exactly what the launcher passed; anyone else's argv (pytest's) is not parsed.
    from dpolab.app.page import parse_page_args

    args = parse_page_args([str(PAGE), *page_args("runs/demo", "base-folder", "my-runs", 2)])
    assert (args.model, args.compare, args.runs_dir, args.max_batch) == ("runs/demo", "base-folder", "my-runs", 2)
    assert parse_page_args(["pytest", "-q", "tests"]).model is None


def test_cli_help_describes_the_app():
    from typer.testing import CliRunner

    from dpolab.cli import app

    result = CliRunner().invoke(app, ["app", "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    for option in ("--compare", "--port", "--host", "--runs-dir", "--max-batch", "MODEL"):
        assert option in result.output


def test_a_model_leaving_the_cache_closes_its_engine(tiny_llama):
    from dpolab.app import page

    loaded = page.load(str(tiny_llama))
    assert loaded.engine.generate(build_prompt("Hi", "qa", loaded.tokenizer), "qa", GREEDY)
    threads = [lane.thread for lane in loaded.engine.lanes if lane.thread is not None]
    assert threads and all(t.is_alive() for t in threads)
    st.cache_resource.clear()  # what a fifth model or a clear does
    assert not any(t.is_alive() for t in threads)


def test_compare_any_two_runs(open_page, tiny_llama, tiny_gpt2, expected, tmp_path):
    """Compare is not only base vs tuned: any run under the runs folder can answer beside the chosen one."""
    runs = tmp_path / "runs"
    for name, folder in (("llama-run", tiny_llama), ("gpt2-run", tiny_gpt2)):
        (runs / name).mkdir(parents=True)
        (runs / name / "model").symlink_to(folder)
    at = open_page(runs / "llama-run", "--runs-dir", runs)
    at.checkbox(key="compare").set_value(True).run()
    options = at.selectbox(key="base_name").options
    assert str(runs / "gpt2-run") in options and str(runs / "llama-run") not in options  # never itself
    at.selectbox(key="base_name").set_value(str(runs / "gpt2-run")).run()
    at = chat(at, QUESTION)
    tuned, other = (texts(column) for column in at.chat_message[1].columns)
    assert other[0].startswith("**Compared · gpt2-run")
    assert tuned[1:] == [expected(QUESTION)] and other[1:] == [expected(QUESTION, folder=tiny_gpt2)]
