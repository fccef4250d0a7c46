"""The studio shell (`app/studio.py`): six pages in the navigation, the right one first, the chat working inside it."""

from __future__ import annotations

import sys

import pytest

st = pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

from dpolab.app.common import PAGES, PAGES_DIR, STUDIO, parse_args  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def studio(monkeypatch):
    def make(*args) -> AppTest:
        monkeypatch.setattr(sys, "argv", [str(STUDIO), *map(str, args)])
        at = AppTest.from_file(str(STUDIO), default_timeout=60)
        at.run()
        assert not at.exception, at.exception
        return at

    return make


def test_every_page_file_exists_and_opens(studio, tmp_path):
    assert [title for _, title in PAGES] == ["Data", "Train", "Runs", "Sweep", "Chat", "Publish"]
    at = studio("--runs-dir", tmp_path / "runs")
    assert at.title[0].value.startswith("Runs")  # without a model the studio opens on the overview
    for file, title in PAGES:
        if file == "chat.py":
            continue  # the chat loads the embedded model when nothing is given; covered below with a tiny one
        assert (PAGES_DIR / file).is_file()
        at.switch_page(f"views/{file}").run()
        assert not at.exception, (file, at.exception)
        assert at.title and title in at.title[0].value, file


def test_a_model_opens_the_chat_page_and_it_answers(studio, tiny_llama, tmp_path):
    at = studio(tiny_llama, "--runs-dir", tmp_path / "runs")
    assert at.chat_input  # the chat page is the first page when a model is given
    at.toggle(key="greedy").set_value(True)
    at.number_input(key="max_new_tokens").set_value(8).run()
    at.chat_input(key="prompt").set_value("Hello?").run()
    assert not at.exception and len(at.chat_message) == 2


def test_options_are_read_only_from_our_own_argv():
    assert parse_args([str(STUDIO), "m", "--runs-dir", "r"]).runs_dir == "r"
    assert parse_args([str(PAGES_DIR / "train.py"), "--runs-dir", "r"]).runs_dir == "r"
    assert parse_args(["/usr/bin/pytest", "-k", "x"]).model is None  # someone else's argv is not ours
