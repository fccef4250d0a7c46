"""Reference log-prob cache: computed once, reused, recomputed when any key changes, never read stale."""

import json

import pytest
import torch

from dpolab.config import DataConfig, TrainConfig
from dpolab.data.prepare import load_prepared, prepare_data
from dpolab.engine import refcache
from dpolab.engine.layout import padded_batch
from dpolab.engine.logprobs import batch_logps
from dpolab.engine.train import run_training
from tests.conftest import write_jsonl


class CountingModel:
    """Wraps a model to count reference forwards."""

    def __init__(self, model):
        self.model, self.calls = model, 0

    def __call__(self):
        self.calls += 1
        return self.model


def _collate(pairs, with_ref=False):
    return padded_batch(pairs, 0)


def _pairs():
    return [{"id": f"p{i}", "prompt_ids": [5, 6, 7 + i], "chosen_ids": [8, 9], "rejected_ids": [10 + i]} for i in range(5)]


def test_cache_hits_misses_and_values(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="sdpa")
    loader = CountingModel(model)
    path = refcache.cache_path(tmp_path, "weights-a", torch.float32)
    pairs = _pairs()
    logps, computed = refcache.ensure_reference(pairs, path, loader, _collate, 2, "cpu", {})
    assert computed == 5 and loader.calls == 1
    with torch.no_grad():
        direct = batch_logps(model, padded_batch(pairs, 0))
    assert logps["p3"] == pytest.approx((direct[3].item(), direct[8].item()), abs=1e-6)
    # Warm: nothing computed, the model is never even requested.
    again, computed = refcache.ensure_reference(pairs, path, loader, _collate, 2, "cpu", {})
    assert computed == 0 and loader.calls == 1 and again == logps
    # New data (a new pair id): only the missing pair is computed.
    extra = pairs + [{"id": "p9", "prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4]}]
    _, computed = refcache.ensure_reference(extra, path, loader, _collate, 2, "cpu", {})
    assert computed == 1
    # Other weights or another dtype: another file, so stale values are never read.
    assert refcache.cache_path(tmp_path, "weights-b", torch.float32) != path
    assert refcache.cache_path(tmp_path, "weights-a", torch.bfloat16) != path


def test_training_runs_no_reference_forward_when_warm(tiny_llama, tokenizer, tmp_path, monkeypatch):
    rows = [{"prompt": f"Say {i}.", "chosen": f"{i}.", "rejected": f"Not {i + 1}."} for i in range(12)]
    src = write_jsonl(tmp_path / "p.jsonl", rows)
    data = tmp_path / "data"
    prepare_data(DataConfig(dataset=str(src), tokenizer=str(tiny_llama), test_size=0.25), data, tokenizer=tokenizer)
    cfg = dict(model=str(tiny_llama), data=DataConfig(dataset=str(data)), epochs=1, batch_size=4, report_to=[],
               eval_every="no")
    calls = []
    original = refcache.compute_logps
    monkeypatch.setattr(refcache, "compute_logps", lambda *a, **k: calls.append(len(a[1])) or original(*a, **k))
    first = run_training(TrainConfig(output_dir=tmp_path / "r1", **cfg))
    assert first.ref_pairs_computed == 12 and calls == [12]
    second = run_training(TrainConfig(output_dir=tmp_path / "r2", learning_rate=1e-4, **cfg))
    assert second.ref_pairs_computed == 0 and calls == [12]
    # Changing the tokenization (another max_length) changes pair ids: those pairs are computed afresh.
    data2 = tmp_path / "data2"
    prepare_data(DataConfig(dataset=str(src), tokenizer=str(tiny_llama), test_size=0.25, max_length=9), data2,
                 tokenizer=tokenizer)
    third = run_training(TrainConfig(output_dir=tmp_path / "r3", **{**cfg, "data": DataConfig(dataset=str(data2))}))
    assert third.ref_pairs_computed > 0
    cache_files = list((data / "refcache").glob("*.json"))
    assert len(cache_files) == 1 and len(json.loads(cache_files[0].read_text())["logps"]) == 12


def test_changed_reference_weights_recompute(tiny_llama, tokenizer, tmp_path):
    import shutil

    from transformers import AutoModelForCausalLM

    rows = [{"prompt": f"Say {i}.", "chosen": f"{i}.", "rejected": f"Not {i + 1}."} for i in range(8)]
    src = write_jsonl(tmp_path / "p.jsonl", rows)
    data = tmp_path / "data"
    prepare_data(DataConfig(dataset=str(src), tokenizer=str(tiny_llama), test_size=0.25), data, tokenizer=tokenizer)
    other = tmp_path / "other"
    shutil.copytree(tiny_llama, other)
    model = AutoModelForCausalLM.from_pretrained(other)
    with torch.no_grad():
        model.model.norm.weight.mul_(1.5)
    model.save_pretrained(other)
    cfg = dict(data=DataConfig(dataset=str(data)), epochs=1, batch_size=4, report_to=[], eval_every="no")
    a = run_training(TrainConfig(output_dir=tmp_path / "a", model=str(tiny_llama), **cfg))
    b = run_training(TrainConfig(output_dir=tmp_path / "b", model=str(other), **cfg))
    assert a.ref_pairs_computed == 8 and b.ref_pairs_computed == 8
    assert len(list((data / "refcache").glob("*.json"))) == 2


def test_packed_and_padded_training_losses_agree(tiny_llama, tokenizer, tmp_path):
    rows = [{"prompt": f"Question {i}: what is {i} times two?", "chosen": f"It is {2 * i}.",
             "rejected": f"Perhaps {i + 7}, I am not sure at all."} for i in range(16)]
    src = write_jsonl(tmp_path / "p.jsonl", rows)
    data = tmp_path / "data"
    prepare_data(DataConfig(dataset=str(src), tokenizer=str(tiny_llama), test_size=0.0), data, tokenizer=tokenizer)
    losses = {}
    for layout in ("packed", "padded"):
        out = tmp_path / layout
        run_training(TrainConfig(output_dir=out, model=str(tiny_llama), data=DataConfig(dataset=str(data)), epochs=2,
                                 batch_size=4, learning_rate=1e-3, layout=layout, report_to=[], eval_every="no",
                                 logging_steps=1, token_budget=60, precision="fp32"))  # not bf16 where native
        history = json.loads((out / "trainer_state.json").read_text())["log_history"]
        losses[layout] = [h["loss"] for h in history if "loss" in h]
    assert len(losses["packed"]) == 8
    assert max(abs(a - b) for a, b in zip(losses["packed"], losses["padded"])) < 1e-4


def test_a_short_run_pays_only_for_the_pairs_it_trains_on(tiny_llama, tokenizer, tmp_path, monkeypatch):
    """max_steps 3 × batch 2 on 30 training pairs: reference log-probs for those 6 (+ the held-out pairs), not 30 —
    and they are exactly the pairs the trainer's loop consumed (recorded in the collator)."""
    from dpolab.engine import trainer as T

    rows = [{"prompt": f"Say {i}.", "chosen": f"{i}.", "rejected": f"Not {i + 1}."} for i in range(40)]
    src = write_jsonl(tmp_path / "p.jsonl", rows)
    data = tmp_path / "data"
    prepare_data(DataConfig(dataset=str(src), tokenizer=str(tiny_llama), test_size=0.25), data, tokenizer=tokenizer)
    seen = []
    original = T.DPOCollator.__call__
    monkeypatch.setattr(T.DPOCollator, "__call__",
                        lambda self, features, with_ref=True: (seen.extend(f["id"] for f in features) if with_ref
                                                              else None) or original(self, features, with_ref))
    cfg = dict(model=str(tiny_llama), data=DataConfig(dataset=str(data)), batch_size=2, report_to=[], eval_every="no",
               seed=7)
    short = run_training(TrainConfig(output_dir=tmp_path / "short", max_steps=3, **cfg))
    assert short.ref_pairs_computed == 6 + 10  # 3 steps × 2 pairs, and the 10 held-out pairs
    cached = json.loads(next((data / "refcache").glob("*.json")).read_text())["logps"]
    test_ids = {r["id"] for r in load_prepared(data).split("test")}
    assert set(seen[:6]) == set(cached) - test_ids  # (the loader may collate one batch ahead, never trained on)
    # Half an epoch (30 pairs, batch 2: ceil(0.5 × 15) = 8 steps) reaches 16 pairs: 10 more than the short run's 6,
    # and the trainer, which refuses a pair without its reference, takes exactly 8 steps on them.
    half = run_training(TrainConfig(output_dir=tmp_path / "half", epochs=0.5, **cfg))
    assert half.ref_pairs_computed == 10
    assert json.loads((tmp_path / "half" / "trainer_state.json").read_text())["global_step"] == 8
    # A full epoch then computes only the 14 pairs the shorter runs did not need.
    full = run_training(TrainConfig(output_dir=tmp_path / "full", epochs=1, **cfg))
    assert full.ref_pairs_computed == 14


def test_the_collator_refuses_a_pair_without_its_reference():
    from dpolab.engine.trainer import DPOCollator, check_reference, features
    from dpolab.errors import TrainingError

    record = {"id": "p1", "prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4]}
    with pytest.raises(TrainingError, match="no reference log-probs for pair p1"):
        check_reference(DPOCollator("packed", 0, 64)(features([record], {})))
    check_reference(DPOCollator("packed", 0, 64)(features([record], {"p1": (-3.0, -4.0)})))
    assert DPOCollator("packed", 0, 64)(features([record], None))["ref_chosen"].tolist() == [0.0]  # reference-free


def test_a_bf16_reference_is_not_reused_for_fp32(tiny_llama, tokenizer, tmp_path):
    """The cache is keyed by dtype: log-probs computed under bf16 autocast (bf16 noise) never stand in for fp32."""
    rows = [{"prompt": f"Say {i}.", "chosen": f"{i}.", "rejected": f"Not {i + 1}."} for i in range(8)]
    src = write_jsonl(tmp_path / "p.jsonl", rows)
    data = tmp_path / "data"
    prepare_data(DataConfig(dataset=str(src), tokenizer=str(tiny_llama), test_size=0.25), data, tokenizer=tokenizer)
    cfg = dict(model=str(tiny_llama), data=DataConfig(dataset=str(data)), epochs=1, batch_size=4, report_to=[],
               eval_every="no")
    half = run_training(TrainConfig(output_dir=tmp_path / "bf16", precision="bf16", **cfg))
    full = run_training(TrainConfig(output_dir=tmp_path / "fp32", precision="fp32", **cfg))
    assert half.ref_pairs_computed == 8 and full.ref_pairs_computed == 8
    caches = {json.loads(p.read_text())["meta"]["dtype"]: json.loads(p.read_text())["logps"]
              for p in (data / "refcache").glob("*.json")}
    assert set(caches) == {"torch.bfloat16", "torch.float32"}
    assert caches["torch.bfloat16"] != caches["torch.float32"]  # the values differ: reuse would be wrong
    again = run_training(TrainConfig(output_dir=tmp_path / "fp32-again", precision="fp32", **cfg))
    assert again.ref_pairs_computed == 0
