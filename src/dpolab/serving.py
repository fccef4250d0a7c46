"""Serving one loaded model to several people at once: continuous batching of their decoding steps.

A `DecodeEngine` owns one model and its worker threads (lanes, below). Requests join the running batch between decoding steps and
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

Lanes: on a CPU a decoding step of a small model is bound by reading the weights, and BLAS runs a matmul of 2-4
rows at ~1.7x the cost of one (measured on an AVX2 EPYC, MKL, one thread), so a second request in the same batch
gains little while a second core nearly doubles throughput. The engine therefore runs one batch per group of cores
(`default_lanes`), each in its own worker thread, and a request joins the least loaded lane; a process-wide
`CorePool` keeps the lanes of all engines (compare mode serves two models) within the cores. On a GPU: one lane.
`bench/app_latency.py` records the load table (1, 2, 4 users; batching vs serialized).
Caches with sliding-window layers cannot be left-padded this way; such a model is served one request at a time.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections import deque
from contextlib import contextmanager
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


def default_lanes(device) -> int:
    """Decoding lanes for an engine: on a CPU one per group of `torch.get_num_threads()` cores, since a small batch
    there is bound by reading the weights and BLAS runs a 2-4 row matmul at ~1.7x the cost of one row (so a second
    request gains little in the same batch but nearly doubles throughput on a second core); on a GPU one."""
    if getattr(device, "type", str(device)) != "cpu":
        return 1
    return max(1, (os.cpu_count() or 1) // max(torch.get_num_threads(), 1))


class CorePool:
    """The CPU cores of this process, taken by model steps: a step on `n` torch threads waits until `n` are free, so
    the lanes of all engines (compare mode serves two models) never run more threads than there are cores; a step
    on more threads than cores takes them all."""

    def __init__(self, cores: int):
        self.free = self.cores = max(1, cores)
        self._changed = threading.Condition()

    @contextmanager
    def take(self, n: int):
        n = min(max(n, 1), self.cores)
        with self._changed:
            self._changed.wait_for(lambda: self.free >= n)
            self.free -= n
        try:
            yield
        finally:
            with self._changed:
                self.free += n
                self._changed.notify_all()


CORES = CorePool(os.cpu_count() or 1)


@dataclass(eq=False)
class Lane:
    """One batch decoded by one worker thread: its requests, their shared left-padded cache and padding mask."""

    index: int
    running: list[Request] = field(default_factory=list)
    next: list = field(default_factory=list)  # per running request: the token to feed next (None: ended)
    cache: object = None  # DynamicCache of the batch
    mask: torch.Tensor | None = None  # (B, T) 1 = real token
    joining: int = 0  # taken from the queue, being prefilled
    thread: threading.Thread | None = None

    @property
    def load(self) -> int:
        return len(self.running) + self.joining


class DecodeEngine:
    """Continuous batching for one model; thread-safe `submit`. `lanes` worker threads (started on first use) each
    decode their own batch; a request joins the least loaded lane with room, `max_batch` requests run at once in
    all, the others wait in one queue."""

    def __init__(self, model, tokenizer, max_batch: int = DEFAULT_MAX_BATCH, lanes: int | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.max_batch = max(1, int(max_batch))
        self.lanes = [Lane(i) for i in range(min(self.max_batch, lanes or default_lanes(model.device)))]
        self.eos = _eos_ids(model, tokenizer)
        self._threads = torch.get_num_threads()  # what the creating thread uses, for the workers too
        self._waiting: deque[Request] = deque()
        self._wake = threading.Condition()
        self._closed = False
        self._one_at_a_time = False  # set at the first prefill if the cache has layers that cannot be left-padded
        self.step_s: float | None = None  # moving average of one decoding step (for queue estimates)

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
            for lane in self.lanes:
                if lane.thread is None:
                    lane.thread = threading.Thread(target=self._work, args=(lane,), name=f"dpolab-decode-{lane.index}",
                                                   daemon=True)
                    lane.thread.start()
            self._announce_queue()
            self._wake.notify_all()
        return request

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify_all()
        for lane in self.lanes:
            if lane.thread is not None:
                lane.thread.join(30)

    @property
    def running(self) -> int:
        return sum(lane.load for lane in self.lanes)

    def generate(self, prompt: str, template: str, settings: GenerationSettings) -> str:
        """The whole answer text (blocking)."""
        return "".join(e.piece for e in self.submit(prompt, template, settings) if isinstance(e, Text))

    # ------------------------------------------------------------------------------------------------ worker
    def _work(self, lane: Lane) -> None:
        torch.set_grad_enabled(False)  # per thread
        torch.set_num_threads(self._threads)
        while True:
            with self._wake:
                while not self._closed and not lane.running and not self._may_take(lane):
                    self._wake.wait()
                if self._closed:
                    for request in [*self._waiting, *lane.running]:
                        request.events.put(Ended("error", len(request.generated), "the server is shutting down"))
                    self._waiting.clear()
                    return
                joining = []
                while self._may_take(lane):
                    joining.append(self._waiting.popleft())
                    lane.joining += 1
            for request in joining:
                if request.stop.is_set():
                    request.events.put(Ended("stopped", 0))
                else:
                    with CORES.take(self._threads):
                        self._prefill(lane, request)
                with self._wake:
                    lane.joining -= 1
                    self._wake.notify_all()  # a lane waiting for the loads to even out may take the next one
            self._drop_ended(lane)
            if lane.running:
                with CORES.take(self._threads):
                    self._step(lane)
                self._drop_ended(lane)
            with self._wake:
                self._announce_queue()
                if not lane.running:
                    self._wake.notify_all()

    def _capacity(self) -> int:
        return 1 if self._one_at_a_time else self.max_batch

    def _may_take(self, lane: Lane) -> bool:
        """Whether `lane` takes the next waiting request (caller holds _wake): there is room in all, this lane is
        the least loaded (so two requests go to two lanes), and under its share of `max_batch`."""
        if not self._waiting or self.running >= self._capacity():
            return False
        share = -(-self._capacity() // len(self.lanes))
        return lane.load < share and lane.load <= min(other.load for other in self.lanes)

    def _prefill(self, lane: Lane, request: Request) -> None:
        from transformers import DynamicCache

        try:
            ids = torch.tensor([request.prompt_ids], device=self.model.device)
            out = self.model(input_ids=ids, attention_mask=torch.ones_like(ids),
                             position_ids=torch.arange(ids.shape[1], device=ids.device)[None],
                             cache=DynamicCache(config=self.model.config), use_cache=True, logits_to_keep=1)
            request._processors = _processors(request.settings, request.min_new_tokens, len(request.prompt_ids),
                                              self.eos)
            if not request.settings.greedy:
                request._generator = torch.Generator(device=self.model.device).manual_seed(request.settings.seed)
            token = self._choose(request, out.logits[:, -1, :])
        except Exception as exc:  # noqa: BLE001 - reported in the request, the engine serves on
            request.events.put(Ended("error", 0, f"{type(exc).__name__}: {exc}"))
            return
        if any(type(layer).__name__ != "DynamicLayer" for layer in out.cache.layers):
            self._one_at_a_time = True  # e.g. sliding-window layers (see the module docstring)
        self._join(lane, request, out.cache)
        self._accept(lane, len(lane.running) - 1, token)

    def _join(self, lane: Lane, request: Request, cache) -> None:
        new_len = cache.get_seq_length()
        new_mask = torch.ones((1, new_len), dtype=torch.long, device=self.model.device)
        if lane.cache is None:
            lane.cache, lane.mask = cache, new_mask
        else:
            width = max(lane.mask.shape[1], new_len)
            for layer, joined in zip(lane.cache.layers, cache.layers):
                layer.keys = torch.cat([_pad_left(layer.keys, width), _pad_left(joined.keys, width)])
                layer.values = torch.cat([_pad_left(layer.values, width), _pad_left(joined.values, width)])
            lane.mask = torch.cat([_pad_left(lane.mask, width, dim=1), _pad_left(new_mask, width, dim=1)])
        lane.running.append(request)
        lane.next.append(-1)

    def _step(self, lane: Lane) -> None:
        started = time.perf_counter()
        inputs = torch.tensor(lane.next, device=self.model.device)[:, None]  # (B, 1)
        positions = lane.mask.sum(dim=1, keepdim=True)  # (B, 1): real tokens so far = the new token's position
        mask = torch.cat([lane.mask, torch.ones_like(inputs)], dim=1)  # (B, T+1)
        try:
            out = self.model(input_ids=inputs, attention_mask=mask, position_ids=positions, cache=lane.cache,
                             use_cache=True, logits_to_keep=1)
        except Exception as exc:  # noqa: BLE001 - every request of the lane hears of it, the engine serves on
            for request in lane.running:
                request.events.put(Ended("error", len(request.generated), f"{type(exc).__name__}: {exc}"))
            lane.running, lane.next, lane.cache, lane.mask = [], [], None, None
            return
        lane.cache, lane.mask = out.cache, mask
        logits = out.logits[:, -1, :]  # (B, V)
        for index, request in enumerate(lane.running):
            try:
                token = self._choose(request, logits[index : index + 1])
            except Exception as exc:  # noqa: BLE001
                request.events.put(Ended("error", len(request.generated), f"{type(exc).__name__}: {exc}"))
                lane.next[index] = None
                continue
            self._accept(lane, index, token)
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

    def _accept(self, lane: Lane, index: int, token: int) -> None:
        """Record `token` for the lane's request `index`, stream its text, and mark it ended when it is."""
        request = lane.running[index]
        request.generated.append(token)
        lane.next[index] = token
        ended = token in self.eos
        text = self.tokenizer.decode(request.generated, skip_special_tokens=True)
        last = ended or len(request.generated) >= request.settings.max_new_tokens
        # A piece ending in U+FFFD is an incomplete UTF-8 character: wait for the next token, unless this is the end.
        if (last or not text.endswith("\ufffd")) and text.startswith(request._sent) and len(text) > len(request._sent):
            request.events.put(Text(text[len(request._sent):]))
            request._sent = text
        if last:
            request.events.put(Ended("eos" if ended else "length", len(request.generated)))
            lane.next[index] = None

    def _drop_ended(self, lane: Lane) -> None:
        keep = []
        for index, request in enumerate(lane.running):
            if lane.next[index] is None:
                continue
            if request.stop.is_set():
                request.events.put(Ended("stopped", len(request.generated)))
                continue
            keep.append(index)
        if len(keep) == len(lane.running):
            return
        with self._wake:  # `running` is read by other lanes deciding whether to take a request
            lane.running = [lane.running[i] for i in keep]
            lane.next = [lane.next[i] for i in keep]
        if not keep:
            lane.cache, lane.mask = None, None
            return
        rows = torch.tensor(keep, device=lane.mask.device)
        mask = lane.mask[rows]
        first = int(mask.any(dim=0).nonzero()[0])  # columns left of it are padding for every request left
        for layer in lane.cache.layers:
            layer.keys = layer.keys[rows, :, first:]
            layer.values = layer.values[rows, :, first:]
        lane.mask = mask[:, first:]

    def _announce_queue(self) -> None:
        """Tell each waiting request its position and an estimate, when either changed (caller holds _wake).
        A waiting request whose stop flag is set leaves the queue here."""
        for request in [r for r in self._waiting if r.stop.is_set()]:
            self._waiting.remove(request)
            request.events.put(Ended("stopped", 0))
        running = [r for lane in self.lanes for r in lane.running]
        remaining = sorted(r.settings.max_new_tokens - len(r.generated) for r in running)
        free = max(self._capacity() - self.running, 0)
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
