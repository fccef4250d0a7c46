import pytest

from dpolab.data.shapes import Pair
from dpolab.data.templates import format_prompt, qa_prompt, render

PAIR = Pair((("user", "Hi"), ("assistant", "Hello"), ("user", "What is 2+2?")),
            "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: What is 2+2?\n\nAssistant:", " It is 4.", " Five.")


def test_qa_template_exact_text():
    assert qa_prompt(PAIR.messages) == "Q: Hi\nA: Hello\nQ: What is 2+2?\nA:"
    assert render(PAIR, "qa") == ("Q: Hi\nA: Hello\nQ: What is 2+2?\nA:", " It is 4.", " Five.")


def test_raw_template_keeps_text_as_is():
    prompt, chosen, rejected = render(PAIR, "raw")
    assert prompt + chosen == PAIR.prompt_text + PAIR.chosen


def test_chat_template_prompt_is_prefix_of_conversation(tokenizer):
    prompt, chosen, _ = render(PAIR, "chat", tokenizer)
    assert prompt.endswith("<|im_start|>assistant\n")
    assert chosen.startswith("It is 4.") and tokenizer.eos_token in chosen
    assert format_prompt(PAIR.messages, "chat", tokenizer) == prompt


@pytest.mark.parametrize("template", ["qa", "raw", "chat"])
def test_template_round_trip_through_tokens(tokenizer, template):
    """Separately tokenized prompt + response decode back to exactly the rendered text."""
    prompt, chosen, _ = render(PAIR, template, tokenizer)
    special = template != "chat"
    p = tokenizer(prompt, add_special_tokens=special).input_ids
    c = tokenizer(chosen, add_special_tokens=False).input_ids
    assert tokenizer.decode(p + c) == prompt + chosen
    assert p + c == tokenizer(prompt + chosen, add_special_tokens=special).input_ids


def test_unknown_template():
    with pytest.raises(ValueError, match="unknown template"):
        format_prompt(PAIR.messages, "alpaca")
