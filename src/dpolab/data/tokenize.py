"""Tokenization to max_length with a documented truncation policy.

Prompt and responses are tokenized separately (3x fewer tokens than TRL's prompt+response re-tokenization;
the template boundaries " "/"\n" start a new pre-token, and a test checks decode(prompt+response) round-trips).
Policy, for a pair whose longer sequence (prompt + longer response + EOS) exceeds max_length:
  1. the prompt keeps its most recent `prompt_cap` tokens (cut from the left: the last turn matters most);
  2. each response is cut from the right to fit max_length - len(prompt);
  3. a pair left without a response token, or with identical responses after the cut, is dropped with a reason.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Tokenized:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    truncated_prompt: bool = False
    truncated_chosen: bool = False
    truncated_rejected: bool = False


def batch_encode(tokenizer, texts: list[str], special: bool) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=special, return_attention_mask=False)["input_ids"]


def with_eos(ids: list[int], eos_id: int | None) -> list[int]:
    if eos_id is None or (ids and ids[-1] == eos_id):
        return ids
    return ids + [eos_id]


def truncate(prompt: list[int], chosen: list[int], rejected: list[int], max_length: int, prompt_cap: int) -> Tokenized:
    out = Tokenized(prompt, chosen, rejected)
    if len(prompt) + max(len(chosen), len(rejected)) <= max_length:
        return out
    if len(prompt) > prompt_cap:
        out.prompt_ids, out.truncated_prompt = prompt[-prompt_cap:], True
    room = max_length - len(out.prompt_ids)
    if len(chosen) > room:
        out.chosen_ids, out.truncated_chosen = chosen[: max(room, 0)], True
    if len(rejected) > room:
        out.rejected_ids, out.truncated_rejected = rejected[: max(room, 0)], True
    return out


def tokenizer_fingerprint(tokenizer) -> str:
    """Vocabulary + special tokens + chat template: data prepared with one tokenizer is refused by another."""
    import hashlib
    import json

    digest = hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    digest.update(str(tokenizer.all_special_tokens).encode())
    digest.update((getattr(tokenizer, "chat_template", None) or "").encode())
    return digest.hexdigest()[:16]
