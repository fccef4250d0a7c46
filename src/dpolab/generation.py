"""Generation shared by evaluation and the app: format a prompt exactly as in training, generate or stream tokens,
stop on demand."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from dpolab.data.templates import format_prompt


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 128
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 50
    repetition_penalty: float = 1.1
    seed: int = 0
    greedy: bool = False

    def generate_kwargs(self) -> dict:
        kwargs = {"max_new_tokens": self.max_new_tokens, "repetition_penalty": self.repetition_penalty}
        if self.greedy:
            return {**kwargs, "do_sample": False}
        return {**kwargs, "do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k}


def build_prompt(user_text: str, template: str, tokenizer=None, history: Sequence[tuple[str, str]] = ()) -> str:
    """The prompt string for a new user turn after `history` ((role, content) turns), in the training template."""
    return format_prompt([*history, ("user", user_text.strip())], template, tokenizer)


def context_limit(model) -> int:
    from dpolab.models import context_length

    return context_length(model.config) or 2048


def encode_prompt(tokenizer, prompt: str, template: str, max_context: int, max_new_tokens: int) -> tuple[torch.Tensor, bool]:
    """Token ids (1, T) of the prompt, cut from the start when prompt + answer would not fit the context."""
    ids = tokenizer(prompt, add_special_tokens=template != "chat", return_tensors="pt").input_ids
    room = max(max_context - max_new_tokens, 1)
    if ids.shape[1] > room:
        return ids[:, -room:], True
    return ids, False


class EventStop:
    """A stopping criterion that ends `generate` when `event` is set (the streamer alone cannot stop it)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def _generate_kwargs(model, tokenizer, prompt: str, template: str, settings: GenerationSettings,
                     stop: threading.Event | None):
    from transformers import StoppingCriteriaList

    ids, truncated = encode_prompt(tokenizer, prompt, template, context_limit(model), settings.max_new_tokens)
    kwargs = dict(input_ids=ids.to(model.device), attention_mask=torch.ones_like(ids).to(model.device),
                  pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id, **settings.generate_kwargs())
    if stop is not None:
        kwargs["stopping_criteria"] = StoppingCriteriaList([EventStop(stop)])
    return kwargs, truncated


@torch.no_grad()
def generate_text(model, tokenizer, prompt: str, template: str, settings: GenerationSettings) -> str:
    """The answer text (prompt excluded), deterministic for a given seed and settings."""
    kwargs, _ = _generate_kwargs(model, tokenizer, prompt, template, settings, None)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(settings.seed)
    try:
        out = model.generate(**kwargs)
    finally:
        torch.random.set_rng_state(generator_state)
    return tokenizer.decode(out[0, kwargs["input_ids"].shape[1] :], skip_special_tokens=True)


_SAMPLING_LOCK = threading.Lock()  # taken after a model's own lock, never before (no lock-order inversion)


def stream_text(model, tokenizer, prompt: str, template: str, settings: GenerationSettings,
                stop: threading.Event | None = None, lock: threading.Lock | None = None) -> tuple[Iterator[str], bool]:
    """(iterator over text pieces as they are generated, whether the prompt was truncated).

    `generate` runs in a worker thread; a `lock` serializes generations on a shared model, and the seed is applied
    through a per-call torch.Generator-free path: the global RNG is seeded inside the lock. The app serves through
    `dpolab.serving.DecodeEngine` (batched); this serialized path is `bench/app_latency.py`'s baseline.
    """
    from transformers import TextIteratorStreamer

    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=300)
    kwargs, truncated = _generate_kwargs(model, tokenizer, prompt, template, settings, stop)

    def work():
        guard = lock or threading.Lock()
        # Sampling draws from torch's one process-wide RNG: two sampled generations at once (two models, e.g. the
        # app's compare mode) would interleave their draws and a seed would no longer reproduce an answer.
        rng = nullcontext() if settings.greedy else _SAMPLING_LOCK
        with guard, rng, torch.no_grad():
            torch.manual_seed(settings.seed)
            try:
                model.generate(**kwargs, streamer=streamer)
            except Exception as exc:  # surface in the consumer instead of hanging it
                streamer.on_finalized_text(f"\n[generation failed: {exc}]", stream_end=True)

    threading.Thread(target=work, daemon=True).start()
    return iter(streamer), truncated
