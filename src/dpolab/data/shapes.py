"""Row shapes -> one `Pair` (explicit prompt/chosen/rejected, HH full transcripts, conversational message lists)
or one `Unpaired` row (prompt, completion, boolean label: KTO data, TRL's unpaired preference shape)."""

from __future__ import annotations

import re
import math
from dataclasses import dataclass, replace
from typing import Any

HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
MARGIN = "margin"  # TRL's RewardTrainer column name
_TURN = re.compile(r"\n\n(Human|Assistant):")


@dataclass(frozen=True)
class Prompted:
    """A prompt: `messages` its turns, `prompt_text` the prompt as written (raw template)."""

    messages: tuple[tuple[str, str], ...]  # ((role, content), ...) ending with a user turn
    prompt_text: str


@dataclass(frozen=True)
class Pair(Prompted):
    """One preference pair; `margin`: the score gap a reward model should put between them (TRL's optional column)."""

    chosen: str
    rejected: str
    margin: float | None = None


@dataclass(frozen=True)
class Unpaired(Prompted):
    """One unpaired preference row: a completion judged desirable (`label` True) or undesirable (False) on its own."""

    completion: str
    label: bool


class Drop(Exception):
    """A row that cannot become a pair; `reason` is one of the accounted drop reasons."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class Columns:
    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"
    completion: str = "completion"
    label: str = "label"


def detect_shape(row: dict[str, Any], cols: Columns) -> str:
    """Shape from the first parsable row; fails at once when the needed columns are absent.

    A row with both a completion and a label column is `unpaired` (checked first: such a row has no chosen/rejected)."""
    found = sorted(row)
    if cols.completion in row and cols.label in row:
        return "unpaired"
    if cols.chosen not in row or cols.rejected not in row:
        raise ValueError(
            f"expected columns {cols.chosen!r} and {cols.rejected!r} (plus {cols.prompt!r} unless they are HH "
            f"transcripts or message lists), or {cols.prompt!r}, {cols.completion!r} and {cols.label!r} for unpaired "
            f"(KTO) rows; found {found}. Map yours with --prompt-column/--chosen-column/--rejected-column/"
            f"--completion-column/--label-column."
        )
    if isinstance(row[cols.chosen], list) or isinstance(row.get(cols.prompt), list):
        return "conversational"
    if cols.prompt in row:
        return "explicit"
    if isinstance(row[cols.chosen], str) and ASSISTANT in row[cols.chosen]:
        return "hh"
    raise ValueError(
        f"found {found}: without a {cols.prompt!r} column, {cols.chosen!r}/{cols.rejected!r} must be HH transcripts "
        f"('\\n\\nHuman: … \\n\\nAssistant: …') or message lists"
    )


def _text(row: dict[str, Any], column: str) -> str:
    if column not in row or row[column] is None:
        raise Drop("missing_field", column)
    value = row[column]
    if not isinstance(value, str):
        raise Drop("non_text_field", f"{column} is {type(value).__name__}")
    if not value.strip():
        raise Drop("empty_field", column)
    return value


def transcript_messages(text: str) -> tuple[tuple[str, str], ...]:
    """'\\n\\nHuman: a\\n\\nAssistant: b\\n\\nHuman: c' -> (('user','a'),('assistant','b'),('user','c'))."""
    parts = _TURN.split(text)
    head, turns = parts[0], parts[1:]
    messages = [("user", head.strip())] if head.strip() else []
    for speaker, content in zip(turns[::2], turns[1::2]):
        messages.append(("user" if speaker == "Human" else "assistant", content.strip()))
    return tuple((role, content) for role, content in messages if content or role == "assistant")


def _split_transcript(text: str, column: str) -> tuple[str, str]:
    cut = text.rfind(ASSISTANT)
    if cut < 0:
        raise Drop("malformed_transcript", f"{column} has no '\\n\\nAssistant:' turn")
    return text[: cut + len(ASSISTANT)], text[cut + len(ASSISTANT) :]


def _prompt_messages(prompt_text: str) -> tuple[tuple[str, str], ...]:
    if ASSISTANT in prompt_text or HUMAN in prompt_text:
        messages = transcript_messages(prompt_text)
        if messages and messages[-1] == ("assistant", ""):
            messages = messages[:-1]  # the trailing '\n\nAssistant:' opener
        return messages
    return (("user", prompt_text.strip()),)


def _check(pair: Pair) -> Pair:
    if not pair.chosen.strip() or not pair.rejected.strip():
        raise Drop("empty_field", "chosen" if not pair.chosen.strip() else "rejected")
    if pair.chosen.strip() == pair.rejected.strip():
        raise Drop("identical", "chosen == rejected")
    if not pair.messages or pair.messages[-1][0] != "user":
        raise Drop("malformed_prompt", "the prompt must end with a user turn")
    return pair


def _messages(value: Any, column: str) -> list[tuple[str, str]]:
    if value is None:
        raise Drop("missing_field", column)
    if not isinstance(value, list) or not value:
        raise Drop("non_text_field" if not isinstance(value, list) else "empty_field", column)
    out = []
    for message in value:
        if not isinstance(message, dict) or not isinstance(message.get("content"), str) or "role" not in message:
            raise Drop("malformed_messages", f"{column}: each message needs 'role' and text 'content'")
        out.append((str(message["role"]), message["content"]))
    return out


def _render_transcript(messages) -> str:
    return "".join(f"{HUMAN if role == 'user' else ASSISTANT} {content}" for role, content in messages if role != "system") + ASSISTANT


def _label(row: dict[str, Any], column: str, text_labels: bool) -> bool:
    """A real bool only: 0/1, "yes"/"no" or scores are refused rather than guessed at (a 0/1 may be a rating).

    `text_labels` (CSV, where every cell is text) also accepts "true"/"false" in any case; a missing or empty label
    is `missing_field`, like any other column."""
    value = row.get(column)
    if value is None:
        raise Drop("missing_field", column)
    if isinstance(value, bool):
        return value
    if text_labels and isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise Drop("label_not_boolean", f"{column} is {type(value).__name__} {str(value)[:40]!r}")


def _completion(value: Any, column: str) -> str:
    """A completion is text, or (conversational) a list holding exactly one assistant message."""
    if isinstance(value, list):
        messages = _messages(value, column)
        if len(messages) != 1 or messages[0][0] != "assistant":
            raise Drop("malformed_messages", f"{column} must be exactly one assistant message")
        return messages[0][1]
    return _text({column: value}, column)


def parse_unpaired(row: dict[str, Any], cols: Columns, text_labels: bool = False) -> Unpaired:
    """prompt (text, HH-style transcript or message list) + completion + label -> `Unpaired`."""
    prompt = row.get(cols.prompt)
    if isinstance(prompt, list):
        messages = tuple(_messages(prompt, cols.prompt))
        prompt_text = _render_transcript(messages)
    else:
        prompt_text = _text(row, cols.prompt)
        messages = _prompt_messages(prompt_text)
    if cols.completion not in row or row[cols.completion] is None:
        raise Drop("missing_field", cols.completion)
    completion = _completion(row[cols.completion], cols.completion)
    if not completion.strip():
        raise Drop("empty_field", cols.completion)
    if not messages or messages[-1][0] != "user":
        raise Drop("malformed_prompt", "the prompt must end with a user turn")
    return Unpaired(messages, prompt_text, completion, _label(row, cols.label, text_labels))


def _margin(value: Any) -> float:
    # CSV cells are text, so a numeric string is taken as its number; a bool is no margin.
    try:
        margin = float(value) if isinstance(value, (int, float, str)) and not isinstance(value, bool) else math.nan
    except ValueError:
        margin = math.nan
    if not math.isfinite(margin):
        raise Drop("bad_margin", f"margin must be a finite number, got {value!r}")
    return margin


def parse_row(row: dict[str, Any], shape: str, cols: Columns, text_labels: bool = False) -> Pair | Unpaired:
    """One raw row of `shape` -> a `Pair` (or `Unpaired` for shape 'unpaired'), or `Drop` with the reason. A pair
    row's `margin` value, when it has one, is kept (a reward model's loss reads it)."""
    if shape == "unpaired":
        return parse_unpaired(row, cols, text_labels)
    pair = _parse_pair(row, shape, cols)
    return pair if row.get(MARGIN) is None else replace(pair, margin=_margin(row[MARGIN]))


def _parse_pair(row: dict[str, Any], shape: str, cols: Columns) -> Pair:
    if shape == "explicit":
        prompt = _text(row, cols.prompt)
        chosen, rejected = _text(row, cols.chosen), _text(row, cols.rejected)
        return _check(Pair(_prompt_messages(prompt), prompt, chosen, rejected))
    if shape == "hh":
        chosen_full, rejected_full = _text(row, cols.chosen), _text(row, cols.rejected)
        prompt_c, chosen = _split_transcript(chosen_full, cols.chosen)
        prompt_r, rejected = _split_transcript(rejected_full, cols.rejected)
        if prompt_c != prompt_r:
            raise Drop("prefix_mismatch", "chosen and rejected transcripts differ before the last Assistant turn")
        return _check(Pair(_prompt_messages(prompt_c), prompt_c, chosen, rejected))
    if shape == "conversational":
        chosen_msgs = _messages(row.get(cols.chosen), cols.chosen)
        rejected_msgs = _messages(row.get(cols.rejected), cols.rejected)
        if cols.prompt in row and row[cols.prompt] is not None:
            prompt = row[cols.prompt]
            prompt_msgs = _messages(prompt, cols.prompt) if isinstance(prompt, list) else [("user", _text(row, cols.prompt))]
            chosen_tail, rejected_tail = chosen_msgs, rejected_msgs
        else:
            if chosen_msgs[:-1] != rejected_msgs[:-1]:
                raise Drop("prefix_mismatch", "chosen and rejected conversations differ before the last message")
            prompt_msgs, chosen_tail, rejected_tail = chosen_msgs[:-1], chosen_msgs[-1:], rejected_msgs[-1:]
        if len(chosen_tail) != 1 or len(rejected_tail) != 1 or chosen_tail[0][0] != "assistant" or rejected_tail[0][0] != "assistant":
            raise Drop("malformed_messages", "chosen/rejected must end with exactly one assistant message")
        messages = tuple(prompt_msgs)
        return _check(Pair(messages, _render_transcript(messages), chosen_tail[0][1], rejected_tail[0][1]))
    raise ValueError(f"unknown shape {shape!r}")
