"""Serving one loaded model to several people at once: continuous batching of their decoding steps.

A `DecodeEngine` owns one model and one worker thread. Requests join the running batch between decoding steps and
leave it when they end (EOS, max_new_tokens, their stop flag, an error), as TGI, vLLM and llama.cpp's server do at
larger scale. Each step runs the model once on the last token of every running request:

  prefill   a joining request runs alone (1, T) on a fresh cache, exactly as `model.generate` starts.
  join      its per-layer (K, V) (1, H, T, D) and the batch's (B, H, T', D) are left-padded to the same length and
            concatenated on the batch axis; a (B, T) mask marks the padding and each request keeps its own
            position ids, so padding changes nothing but float rounding.
  step      input (B, 1), mask (B, T+1), positions (B, 1) -> logits (B, V); the cache grows by one column.
  leave     the batch axis is index-selected and all-padding columns on the left are dropped.

Each request has its own logits processors (transformers' repetition penalty, temperature, top-k, top-p, built as
`generate` builds them) and its own `torch.Generator` seeded with its seed, so what it samples does not depend on
who else is generating: alone, a request gives what `generate` gives after `torch.manual_seed(seed)` (tested), and
batched the same text wherever the logits agree (padding and batch shape move logits by float rounding only; greedy
outputs can then differ only from a near-tie on). A request that finds the batch full waits in a queue and is told
its position and an estimate of the wait.

Cost: one decoding step of a small model on a CPU is bound by reading the weights, so a batch of B costs little
more than one request and total tokens/s grows almost B-fold (`bench/app_latency.py` records the load table).
Caches with sliding-window layers cannot be left-padded this way; such a model is served one request at a time.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from dpolab.generation import GenerationSettings, context_limit, encode_prompt

DEFAULT_MAX_BATCH = 4


@dataclass(frozen=True)
class Queued:
    position: int  # 1 = next to start
    eta_s: float | None  # estimated seconds until it starts (None: no estimate yet)


@dataclass(frozen=True)
class Text:
    piece: str


@dataclass(frozen=True)
class Ended:
    reason: str  # "eos" | "length" | "stopped" | "error"
    tokens: int  # new tokens generated
    error: str | None = None


@dataclass(eq=False)
class Request:
    """One answer being generated. `events` yields Queued*, then Text* and exactly one Ended, in that order."""

    prompt_ids: list[int]
    settings: GenerationSettings
    stop: threading.Event
    min_new_tokens: int = 0
    truncated: bool = False  # the prompt was cut from the start to fit the context
    events: queue.Queue = field(default_factory=queue.Queue)
    generated: list[int] = field(default_factory=list)
    # worker-side state
    _processors: object = None
    _generator: torch.Generator | None = None
    _sent: str = ""
    _queued_shown: tuple = ()
    submitted: float = field(default_factory=time.monotonic)

    def __iter__(self):
        """The events until the end (blocking)."""
        while True:
            event = self.events.get()
            yield event
            if isinstance(event, Ended):
                return


def _processors(settings: GenerationSettings, min_new_tokens: int, prompt_len: int, eos: list[int]):
    """The logits processors `generate` builds for these settings, in its order (see GenerationMixin's
    _get_logits_processor): repetition penalty, min new tokens, then for sampling temperature, top-k, top-p."""
    from transformers import (
        LogitsProcessorList,
        MinNewTokensLengthLogitsProcessor,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    procs = LogitsProcessorList()
    if settings.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(settings.repetition_penalty))
    if min_new_tokens > 0 and eos:
        procs.append(MinNewTokensLengthLogitsProcessor(prompt_len, min_new_tokens, torch.tensor(eos)))
    if not settings.greedy:
        if settings.temperature != 1.0:
            procs.append(TemperatureLogitsWarper(settings.temperature))
        if settings.top_k:
            procs.append(TopKLogitsWarper(top_k=settings.top_k))
        if settings.top_p < 1.0:
            procs.append(TopPLogitsWarper(top_p=settings.top_p))
    return procs


def _eos_ids(model, tokenizer) -> list[int]:
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    return [e for e in (eos if isinstance(eos, list) else [eos]) if e is not None]


class DecodeEngine:
    """Continuous batching for one model; thread-safe `submit`, one worker thread started on first use."""

    def __init__(self, model, tokenizer, max_batch: int = DEFAULT_MAX_BATCH):
        self.model, self.tokenizer = model, tokenizer
        self.max_batch = max(1, int(max_batch))
        self.eos = _eos_ids(model, tokenizer)
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []
        self._cache = None  # DynamicCache of the running batch, left-padded
        self._mask: torch.Tensor | None = None  # (B, T) 1 = real token
        self._next: list[int] = []  # per running request: the token to feed next
        self._joining = 0  # taken from the queue, being prefilled
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._one_at_a_time = False  # set at the first prefill if the cache has layers that cannot be left-padded
        self.step_s: float | None = None  # moving average of one decoding step (for queue estimates)
        self.prefill_token_s: float | None = None

    # ------------------------------------------------------------------------------------------------ public
    def submit(self, prompt: str, template: str, settings: GenerationSettings, stop: threading.Event | None = None,
               min_new_tokens: int = 0) -> Request:
        ids, truncated = encode_prompt(self.tokenizer, prompt, template, context_limit(self.model),
                                       settings.max_new_tokens)
        return self.submit_ids(ids[0].tolist(), settings, stop, min_new_tokens, truncated)

    def submit_ids(self, prompt_ids: list[int], settings: GenerationSettings, stop: threading.Event | None = None,
                   min_new_tokens: int = 0, truncated: bool = False) -> Request:
        request = Request(list(prompt_ids), settings, stop or threading.Event(), min_new_tokens, truncated)
        with self._wake:
            if self._closed:
                raise RuntimeError("the generation engine is closed")
            self._waiting.append(request)
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="dpolab-decode", daemon=True)
                self._thread.start()
            self._announce_queue()
            self._wake.notify()
        return request

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(30)

    @property
    def busy(self) -> int:
        return len(self._running) + len(self._waiting)

    def generate(self, prompt: str, template: str, settings: GenerationSettings) -> str:
        """The whole answer text (blocking)."""
        return "".join(e.piece for e in self.submit(prompt, template, settings) if isinstance(e, Text))

    # ------------------------------------------------------------------------------------------------ worker
    def _work(self) -> None:
        torch.set_grad_enabled(False)  # per thread
        while True:
            with self._wake:
                while not self._closed and not self._waiting and not self._running:
                    self._wake.wait()
                if self._closed:
                    for request in [*self._waiting, *self._running]:
                        request.events.put(Ended("error", len(request.generated), "the server is shutting down"))
                    return
                joining = []
                while self._waiting and len(self._running) + len(joining) < self._capacity():
                    joining.append(self._waiting.popleft())
                self._joining = len(joining)
            for request in joining:
                if request.stop.is_set():
                    self._finish_waiting(request)
                else:
                    self._prefill(request)
                with self._wake:
                    self._joining -= 1
            self._drop_ended()
            if self._running:
                self._step()
                self._drop_ended()
            with self._wake:
                self._announce_queue()

    def _capacity(self) -> int:
        return 1 if self._one_at_a_time else self.max_batch

    def _finish_waiting(self, request: Request) -> None:
        request.events.put(Ended("stopped", 0))

    def _prefill(self, request: Request) -> None:
        from transformers import DynamicCache

        started = time.perf_counter()
        try:
            ids = torch.tensor([request.prompt_ids], device=self.model.device)
            cache = DynamicCache(config=self.model.config)
            out = self.model(input_ids=ids, attention_mask=torch.ones_like(ids),
                             position_ids=torch.arange(ids.shape[1], device=ids.device)[None], cache=cache,
                             use_cache=True, logits_to_keep=1)
            request._processors = _processors(request.settings, request.min_new_tokens, len(request.prompt_ids),
                                              self.eos)
            if not request.settings.greedy:
                request._generator = torch.Generator(device=self.model.device).manual_seed(request.settings.seed)
            token = self._choose(request, out.logits[:, -1, :])
        except Exception as exc:  # noqa: BLE001 - reported in the request, the engine serves on
            request.events.put(Ended("error", 0, f"{type(exc).__name__}: {exc}"))
            return
        elapsed = time.perf_counter() - started
        per_token = elapsed / max(len(request.prompt_ids), 1)
        self.prefill_token_s = per_token if self.prefill_token_s is None else 0.7 * self.prefill_token_s + 0.3 * per_token
        if any(type(layer).__name__ != "DynamicLayer" for layer in out.cache.layers):
            self._one_at_a_time = True  # e.g. sliding-window layers (see the module docstring)
        self._join(request, out.cache)
        self._accept(len(self._running) - 1, token)

    def _join(self, request: Request, cache) -> None:
        new_len = cache.get_seq_length()
        new_mask = torch.ones((1, new_len), dtype=torch.long, device=self.model.device)
        if self._cache is None:
            self._cache, self._mask = cache, new_mask
        else:
            old_len = self._mask.shape[1]
            width = max(old_len, new_len)
            for layer, joined in zip(self._cache.layers, cache.layers):
                layer.keys = torch.cat([_pad_left(layer.keys, width), _pad_left(joined.keys, width)])
                layer.values = torch.cat([_pad_left(layer.values, width), _pad_left(joined.values, width)])
            self._mask = torch.cat([_pad_left(self._mask, width, dim=1), _pad_left(new_mask, width, dim=1)])
        self._running.append(request)
        self._next.append(-1)

    def _step(self) -> None:
        started = time.perf_counter()
        device = self.model.device
        inputs = torch.tensor(self._next, device=device)[:, None]  # (B, 1)
        positions = (self._mask.sum(dim=1, keepdim=True))  # (B, 1): real tokens so far = the new token's position
        mask = torch.cat([self._mask, torch.ones_like(inputs)], dim=1)  # (B, T+1)
        try:
            out = self.model(input_ids=inputs, attention_mask=mask, position_ids=positions,
                             cache=self._cache, use_cache=True, logits_to_keep=1)
        except Exception as exc:  # noqa: BLE001 - every running request hears of it, the engine serves on
            for request in self._running:
                request.events.put(Ended("error", len(request.generated), f"{type(exc).__name__}: {exc}"))
            self._running, self._next, self._cache, self._mask = [], [], None, None
            return
        self._cache, self._mask = out.cache, mask
        logits = out.logits[:, -1, :]  # (B, V)
        for index, request in enumerate(self._running):
            try:
                token = self._choose(request, logits[index : index + 1])
            except Exception as exc:  # noqa: BLE001
                request.events.put(Ended("error", len(request.generated), f"{type(exc).__name__}: {exc}"))
                self._next[index] = None
                continue
            self._accept(index, token)
        elapsed = time.perf_counter() - started
        self.step_s = elapsed if self.step_s is None else 0.8 * self.step_s + 0.2 * elapsed

    def _choose(self, request: Request, logits: torch.Tensor) -> int:
        """The next token of one request from its (1, V) logits, through its own processors and generator."""
        seen = torch.tensor([request.prompt_ids + request.generated], device=logits.device)
        scores = request._processors(seen, logits.float())
        if request.settings.greedy:
            return int(scores.argmax(dim=-1))
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, num_samples=1, generator=request._generator))

    def _accept(self, index: int, token: int) -> None:
        """Record `token` for running request `index`, stream its text, and mark it ended when it is."""
        request = self._running[index]
        request.generated.append(token)
        self._next[index] = token
        ended = token in self.eos
        text = self.tokenizer.decode(request.generated, skip_special_tokens=True)
        if not text.endswith("\ufffd") and text.startswith(request._sent) and len(text) > len(request._sent):
            request.events.put(Text(text[len(request._sent):]))
            request._sent = text
        if ended or len(request.generated) >= request.settings.max_new_tokens:
            if text.startswith(request._sent) and len(text) > len(request._sent):
                request.events.put(Text(text[len(request._sent):]))
                request._sent = text
            request.events.put(Ended("eos" if ended else "length", len(request.generated)))
            self._next[index] = None

    def _drop_ended(self) -> None:
        keep = []
        for index, request in enumerate(self._running):
            if self._next[index] is None:
                continue
            if request.stop.is_set():
                request.events.put(Ended("stopped", len(request.generated)))
                continue
            keep.append(index)
        if len(keep) == len(self._running):
            return
        self._running = [self._running[i] for i in keep]
        self._next = [self._next[i] for i in keep]
        if not keep:
            self._cache, self._mask = None, None
            return
        rows = torch.tensor(keep, device=self._mask.device)
        mask = self._mask[rows]
        first = int(mask.any(dim=0).nonzero()[0])  # columns left of it are padding for every request left
        for layer in self._cache.layers:
            layer.keys = layer.keys[rows, :, first:]
            layer.values = layer.values[rows, :, first:]
        self._mask = mask[:, first:]

    def _announce_queue(self) -> None:
        """Tell each waiting request its position and an estimate, when either changed (caller holds _wake).
        A waiting request whose stop flag is set leaves the queue here."""
        for request in [r for r in self._waiting if r.stop.is_set()]:
            self._waiting.remove(request)
            self._finish_waiting(request)
        remaining = sorted(r.settings.max_new_tokens - len(r.generated) for r in self._running)
        free = max(self._capacity() - len(self._running) - self._joining, 0)
        for index, request in enumerate(self._waiting):
            position = index + 1 - free  # <= 0: a free place is there, it starts at the next step
            if position <= 0:
                continue
            eta = None
            if self.step_s is not None and remaining:
                # It starts when `position` places have freed: at worst the position-th shortest remaining answer.
                eta = remaining[min(position, len(remaining)) - 1] * self.step_s
            shown = (position, None if eta is None else round(eta))
            if shown != request._queued_shown:
                request._queued_shown = shown
                request.events.put(Queued(position, eta))


def _pad_left(tensor: torch.Tensor, width: int, dim: int = 2) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)
