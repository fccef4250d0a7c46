import pytest

from dpolab.data.shapes import Columns, Drop, detect_shape, parse_row, transcript_messages

COLS = Columns()


def test_detect_each_shape():
    assert detect_shape({"prompt": "p", "chosen": "a", "rejected": "b"}, COLS) == "explicit"
    assert detect_shape({"chosen": "\n\nHuman: hi\n\nAssistant: a", "rejected": "x"}, COLS) == "hh"
    assert detect_shape({"chosen": [{"role": "user", "content": "x"}], "rejected": []}, COLS) == "conversational"


def test_missing_columns_names_expected_and_found():
    with pytest.raises(ValueError) as err:
        detect_shape({"question": "q", "good": "a"}, COLS)
    assert "'chosen'" in str(err.value) and "'rejected'" in str(err.value) and "['good', 'question']" in str(err.value)


def test_explicit_with_hh_style_prompt_parses_turns():
    pair = parse_row({"prompt": "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Bye?\n\nAssistant:",
                      "chosen": " Bye!", "rejected": " No."}, "explicit", COLS)
    assert pair.messages == (("user", "Hi"), ("assistant", "Hello"), ("user", "Bye?"))
    assert pair.chosen == " Bye!"


def test_hh_prompt_is_shared_prefix_through_last_assistant():
    row = {"chosen": "\n\nHuman: a?\n\nAssistant: b\n\nHuman: c?\n\nAssistant: good",
           "rejected": "\n\nHuman: a?\n\nAssistant: b\n\nHuman: c?\n\nAssistant: bad"}
    pair = parse_row(row, "hh", COLS)
    assert pair.prompt_text == "\n\nHuman: a?\n\nAssistant: b\n\nHuman: c?\n\nAssistant:"
    assert (pair.chosen, pair.rejected) == (" good", " bad")
    assert pair.messages[-1] == ("user", "c?")


def test_conversational_without_prompt_column():
    prompt = [{"role": "user", "content": "2+2?"}]
    pair = parse_row({"chosen": prompt + [{"role": "assistant", "content": "4"}],
                      "rejected": prompt + [{"role": "assistant", "content": "5"}]}, "conversational", COLS)
    assert pair.messages == (("user", "2+2?"),) and (pair.chosen, pair.rejected) == ("4", "5")


def test_conversational_with_prompt_column():
    pair = parse_row({"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "a"}],
                      "rejected": [{"role": "assistant", "content": "b"}]}, "conversational", COLS)
    assert pair.messages == (("user", "hi"),)


@pytest.mark.parametrize("row,shape,reason", [
    ({"prompt": "p", "chosen": None, "rejected": "b"}, "explicit", "missing_field"),
    ({"prompt": "p", "rejected": "b"}, "explicit", "missing_field"),
    ({"prompt": "p", "chosen": "  ", "rejected": "b"}, "explicit", "empty_field"),
    ({"prompt": "p", "chosen": 3, "rejected": "b"}, "explicit", "non_text_field"),
    ({"prompt": "p", "chosen": "same", "rejected": "same "}, "explicit", "identical"),
    ({"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: b\n\nAssistant: y"}, "hh", "prefix_mismatch"),
    ({"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "no turns at all"}, "hh", "malformed_transcript"),
    ({"chosen": "\n\nHuman: a\n\nAssistant:", "rejected": "\n\nHuman: a\n\nAssistant: y"}, "hh", "empty_field"),
    ({"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "x"}],
      "rejected": [{"role": "user", "content": "b"}, {"role": "assistant", "content": "y"}]}, "conversational", "prefix_mismatch"),
    ({"chosen": [{"content": "a"}], "rejected": [{"role": "assistant", "content": "y"}]}, "conversational", "malformed_messages"),
])
def test_drop_reasons(row, shape, reason):
    with pytest.raises(Drop) as err:
        parse_row(row, shape, COLS)
    assert err.value.reason == reason


def test_transcript_messages():
    assert transcript_messages("\n\nHuman: a\n\nAssistant: b") == (("user", "a"), ("assistant", "b"))
