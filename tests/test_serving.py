"""The batching engine (dpolab.serving): alone it gives what `model.generate` gives; batched, the same text up to
float near-ties; requests join, leave, wait in line, stop and fail one by one."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from dpolab.generation import GenerationSettings, build_prompt, generate_text
from dpolab.models import load_model, load_tokenizer
from dpolab.serving import DecodeEngine, Ended, Queued, Text

GREEDY = GenerationSettings(greedy=True, max_new_tokens=40)
SAMPLED = GenerationSettings(max_new_tokens=40, seed=7)
PROMPTS = ["What is the purpose of life?", "How do I make good tea?", "Tips for a job interview?", "Hello",
           "Tell me a joke.", "Why is the sky blue?", "Write a haiku about rain.", "How to live a healthy life?",
           "What is 2 + 2?", "Name three colours.", "Explain DPO in one sentence.", "What should I cook tonight?",
           "Give me a reason to learn Python.", "Where do penguins live?", "How far is the moon?",
           "Is coffee bad for you?", "Say something kind.", "What is a language model?", "Describe a cat.",
           "What time is it?"]
NEAR_TIE = 1e-3
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def chatty(chatty_llama):
    return load_model(str(chatty_llama)).eval(), load_tokenizer(str(chatty_llama))


@pytest.fixture
def engine(chatty):
    engines = []

    def make(max_batch: int = 3, model=None, lanes: int = 1) -> DecodeEngine:
        engines.append(DecodeEngine(model or chatty[0], chatty[1], max_batch=max_batch, lanes=lanes))
        return engines[-1]

    yield make
    for e in engines:
        e.close()


def prompt(tokenizer, question: str) -> str:
    return build_prompt(question, "qa", tokenizer)


def collect(request) -> tuple[str, Ended, list]:
    events = list(request)
    return "".join(e.piece for e in events if isinstance(e, Text)), events[-1], events


@pytest.mark.parametrize("settings", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_alone_it_answers_what_generate_answers(chatty, engine, settings):
    model, tokenizer = chatty
    one = engine(max_batch=1)
    for question in PROMPTS[:4]:
        text, end, _ = collect(one.submit(prompt(tokenizer, question), "qa", settings))
        assert text == generate_text(model, tokenizer, prompt(tokenizer, question), "qa", settings)
        assert end.reason in ("eos", "length") and end.tokens > 0


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def top2_gap(model, tokenizer, prompt_ids: list[int], generated: list[int], settings: GenerationSettings) -> float:
    """The gap between the two best processed scores where `generated` continues (an independent full forward)."""
    from transformers import RepetitionPenaltyLogitsProcessor

    ids = torch.tensor([prompt_ids + generated])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, -1, :].float()
    scores = RepetitionPenaltyLogitsProcessor(settings.repetition_penalty)(ids, logits)
    top = scores.topk(2).values[0]
    return float(top[0] - top[1])


def batched_vs_alone(model, tokenizer, make, settings: GenerationSettings, questions: list[str]):
    alone = [make(max_batch=1).submit(prompt(tokenizer, q), "qa", settings) for q in questions]
    for request in alone:
        collect(request)
    batch = make(max_batch=3)
    together = [batch.submit(prompt(tokenizer, q), "qa", settings) for q in questions]  # joining as others leave
    for request in together:
        collect(request)
    return alone, together


def check_batched_equals_alone(model, tokenizer, alone, together, settings, at_least: int) -> None:
    same = 0
    for a, b in zip(alone, together):
        k = first_difference(a.generated, b.generated)
        if k is None:
            same += 1
            continue
        gap = top2_gap(model, tokenizer, a.prompt_ids, a.generated[:k], settings)
        assert gap < NEAR_TIE, f"batched differs from alone at token {k} where the top-2 gap is {gap:.2e}"
    assert same >= at_least, f"only {same} of {len(alone)} identical"


def test_batched_greedy_equals_alone_but_for_near_ties(chatty, engine):
    model, tokenizer = chatty
    settings = GenerationSettings(greedy=True, max_new_tokens=24)
    alone, together = batched_vs_alone(model, tokenizer, engine, settings, PROMPTS)
    check_batched_equals_alone(model, tokenizer, alone, together, settings, at_least=19)


def test_seeded_sampling_is_the_same_alone_and_batched(chatty, engine):
    model, tokenizer = chatty
    # Each request its own seed: batched, what one samples cannot depend on the others.
    settings = [GenerationSettings(max_new_tokens=24, seed=seed) for seed in range(6)]
    one = engine(max_batch=1)
    alone = [collect(one.submit(prompt(tokenizer, q), "qa", s))[0] for q, s in zip(PROMPTS, settings)]
    batch = engine(max_batch=3)
    requests = [batch.submit(prompt(tokenizer, q), "qa", s) for q, s in zip(PROMPTS, settings)]
    assert [collect(r)[0] for r in requests] == alone
    assert len(set(alone)) == len(alone)  # the seeds and prompts really differ


def test_two_lanes_answer_at_once_what_each_answers_alone(chatty, engine):
    """Lanes: two worker threads, each with its own batch; requests spread over them, answers unchanged."""
    model, tokenizer = chatty
    two = engine(max_batch=4, lanes=2)
    settings = GenerationSettings(greedy=True, max_new_tokens=24)
    requests = [two.submit(prompt(tokenizer, q), "qa", settings) for q in PROMPTS[:4]]
    texts = [collect(r)[0] for r in requests]
    assert texts == [generate_text(model, tokenizer, prompt(tokenizer, q), "qa", settings) for q in PROMPTS[:4]]
    assert len(two.lanes) == 2 and all(lane.thread is not None for lane in two.lanes)


def test_a_request_goes_to_the_least_loaded_lane(chatty, engine):
    _, tokenizer = chatty
    two = engine(max_batch=4, lanes=2)
    settings = GenerationSettings(greedy=True, max_new_tokens=200)
    first = two.submit(prompt(tokenizer, "Hi"), "qa", settings, min_new_tokens=200)
    next(iter(first))
    second = two.submit(prompt(tokenizer, "Hello"), "qa", settings, min_new_tokens=200)
    next(iter(second))
    assert sorted(len(lane.running) for lane in two.lanes) == [1, 1]
    first.stop.set()
    second.stop.set()


def test_requests_stream_together_and_a_full_batch_queues(chatty, engine):
    model, tokenizer = chatty
    two = engine(max_batch=2)
    settings = GenerationSettings(greedy=True, max_new_tokens=60)
    # min_new_tokens: no early EOS, so the two first answers are surely running when the third arrives
    first = [two.submit(prompt(tokenizer, q), "qa", settings, min_new_tokens=60) for q in PROMPTS[:2]]
    third = two.submit(prompt(tokenizer, PROMPTS[2]), "qa", settings)
    _, end, events = collect(third)
    queued = [e for e in events if isinstance(e, Queued)]
    assert queued and queued[0].position == 1, events[:3]
    assert all(isinstance(e, Queued) for e in events[: len(queued)])  # never text before its turn
    assert end.reason in ("eos", "length")
    # The first two interleaved: each produced text before the other ended.
    for request in first:
        text, end, _ = collect(request)
        assert end.reason == "length" and end.tokens == 60 and text


def test_stop_ends_a_request_at_once_and_frees_its_place(chatty, engine):
    model, tokenizer = chatty
    one = engine(max_batch=1)
    stop = threading.Event()
    long = one.submit(prompt(tokenizer, "Hi"), "qa", GenerationSettings(greedy=True, max_new_tokens=1000), stop,
                      min_new_tokens=1000)
    waiting_stop = threading.Event()
    waiting = one.submit(prompt(tokenizer, "Hello"), "qa", GREEDY, waiting_stop)
    next(iter(long))  # it runs
    waiting_stop.set()  # a waiting request can be stopped too
    assert collect(waiting)[1] == Ended("stopped", 0)
    stop.set()
    started = time.monotonic()
    _, end, _ = collect(long)
    assert end.reason == "stopped" and end.tokens < 1000 and time.monotonic() - started < 2
    text, end, _ = collect(one.submit(prompt(tokenizer, PROMPTS[0]), "qa", GREEDY))  # the place is free again
    assert text == generate_text(chatty[0], tokenizer, prompt(tokenizer, PROMPTS[0]), "qa", GREEDY)


def test_an_answer_cut_by_the_token_limit_says_so(chatty, engine):
    _, tokenizer = chatty
    _, end, _ = collect(engine().submit(prompt(tokenizer, "Hi"), "qa", GenerationSettings(greedy=True, max_new_tokens=5),
                                        min_new_tokens=5))
    assert end == Ended("length", 5)


class Flaky(torch.nn.Module):
    """Wraps a model; its forward fails while `fail` is set (a model error in the middle of serving)."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.fail = model, False
        self.config, self.generation_config = model.config, model.generation_config

    @property
    def device(self):
        return self.inner.device

    def forward(self, **kwargs):
        if self.fail:
            raise RuntimeError("out of memory (simulated)")
        return self.inner(**kwargs)


def test_a_model_error_ends_the_request_with_the_message_and_the_engine_serves_on(chatty, engine):
    model, tokenizer = chatty
    flaky = Flaky(model)
    e = engine(model=flaky)
    flaky.fail = True
    _, end, _ = collect(e.submit(prompt(tokenizer, "Hi"), "qa", GREEDY))
    assert end.reason == "error" and "out of memory (simulated)" in end.error
    flaky.fail = False
    assert collect(e.submit(prompt(tokenizer, PROMPTS[0]), "qa", GREEDY))[0] == generate_text(
        model, tokenizer, prompt(tokenizer, PROMPTS[0]), "qa", GREEDY)


class Recording(DecodeEngine):
    """Records (batch size, cache width, fewest real tokens of a row) at every decoding step."""

    def _step(self, lane):
        self.seen = [*getattr(self, "seen", []), (lane.mask.shape[0], lane.mask.shape[1], int(lane.mask.sum(1).min()))]
        super()._step(lane)


def test_leaving_requests_trim_the_shared_cache(chatty):
    """A long prompt joins, ends early; the left padding it forced on the running answer is dropped when it leaves."""
    model, tokenizer = chatty
    e = Recording(model, tokenizer, max_batch=2, lanes=1)
    try:
        short = e.submit(prompt(tokenizer, "Hi"), "qa", GenerationSettings(greedy=True, max_new_tokens=80),
                         min_new_tokens=80)
        next(iter(short))
        long = e.submit(prompt(tokenizer, "history " * 300), "qa", GenerationSettings(greedy=True, max_new_tokens=3),
                        min_new_tokens=3)
        collect(long)
        collect(short)
    finally:
        e.close()
    together = [s for s in e.seen if s[0] == 2]
    assert together and together[0][1] > together[0][2] + 250  # the short answer was padded to the long prompt
    after = e.seen[e.seen.index(together[-1]) + 1 :]
    assert after and all(width == real for _, width, real in after)  # no padding column left once it left
    assert e.lanes[0].cache is None and e.lanes[0].mask is None  # all left: nothing held


@pytest.mark.slow
def test_embedded_model_batched_equals_alone(embedded_dir, engine):
    """The acceptance check on the real model: 20 prompts, alone vs in a batch of 3, greedy."""
    model, tokenizer = load_model(str(embedded_dir)).eval(), load_tokenizer(str(embedded_dir))
    settings = GenerationSettings(greedy=True, max_new_tokens=32)
    questions = [build_prompt(q, "chat", tokenizer) for q in PROMPTS]
    alone = engine(max_batch=1, model=model)
    single = [alone.submit_ids(tokenizer(q, add_special_tokens=False).input_ids, settings) for q in questions]
    for r in single:
        collect(r)
    batch = engine(max_batch=3, model=model)
    together = [batch.submit_ids(tokenizer(q, add_special_tokens=False).input_ids, settings) for q in questions]
    for r in together:
        collect(r)
    check_batched_equals_alone(model, tokenizer, single, together, settings, at_least=19)


def test_the_serialized_baseline_gives_each_concurrent_caller_its_whole_answer(chatty):
    """`generation.stream_text` (the engine the app had, kept as bench/app_latency.py's baseline): one at a time."""
    from dpolab.generation import stream_text

    model, tokenizer = chatty
    lock = threading.Lock()
    results: dict[str, str] = {}

    def user(question: str) -> None:
        pieces, _ = stream_text(model, tokenizer, prompt(tokenizer, question), "qa", GREEDY, lock=lock)
        results[question] = "".join(pieces)

    threads = [threading.Thread(target=user, args=(q,)) for q in PROMPTS[:3]]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert results == {q: generate_text(model, tokenizer, prompt(tokenizer, q), "qa", GREEDY) for q in PROMPTS[:3]}
