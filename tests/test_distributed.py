"""2-process CPU training (torchrun, gloo) equals 1-process training with the same global batch and seed."""

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dpolab.config import DataConfig, TrainConfig
from dpolab.data.prepare import load_prepared, prepare_data
from tests.conftest import write_jsonl

REPO = Path(__file__).resolve().parents[1]

# Runs in every rank: records which pairs each rank trained on, and how many reference pairs it computed.
RANK_SCRIPT = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path
    from dpolab.config import TrainConfig
    from dpolab.engine import refcache, trainer as trainer_module
    from dpolab.engine.train import run_training

    rank = os.environ.get("RANK", "0")
    trace = Path(sys.argv[2]) / f"rank{rank}.jsonl"
    original_call, original_compute = trainer_module.DPOCollator.__call__, refcache.compute_logps

    def recording_call(self, features, with_ref=True):
        if with_ref:
            with open(trace, "a") as handle:
                handle.write(json.dumps({"ids": [f["id"] for f in features]}) + "\\n")
        return original_call(self, features, with_ref)

    def recording_compute(model, pairs, *args, **kwargs):
        with open(trace, "a") as handle:
            handle.write(json.dumps({"reference_pairs": len(pairs)}) + "\\n")
        return original_compute(model, pairs, *args, **kwargs)

    trainer_module.DPOCollator.__call__ = recording_call
    refcache.compute_logps = recording_compute
    run_training(TrainConfig.model_validate_json(sys.argv[1]))
""")


def _cfg(model, data, out, batch_size):
    return TrainConfig(output_dir=out, model=str(model), data=DataConfig(dataset=str(data)), epochs=2,
                       batch_size=batch_size, learning_rate=1e-3, eval_every="epoch", save_every="epoch",
                       report_to=["tensorboard"], logging_steps=1, seed=5, token_budget=64,
                       precision="fp32")  # `auto` is bf16 on a CPU with native bf16: the tolerances below are fp32's


def _run(tmp_path, cfg, nproc):
    trace = tmp_path / f"trace{nproc}"
    trace.mkdir()
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    if nproc == 1:
        cmd = [sys.executable, str(script), cfg.model_dump_json(exclude_unset=True), str(trace)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(script), cfg.model_dump_json(exclude_unset=True), str(trace)]
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                         env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    records = {}
    for file in trace.glob("rank*.jsonl"):
        records[file.stem] = [json.loads(line) for line in file.read_text().splitlines()]
    return records


def test_two_processes_match_one(tmp_path, tiny_llama, tokenizer):
    rows = [{"prompt": f"Question {i}: what is {i} plus one?", "chosen": f"It is {i + 1}, as {i} plus one is {i + 1}.",
             "rejected": "No." if i % 2 else f"Maybe {i + 7}."} for i in range(40)]
    src = write_jsonl(tmp_path / "pairs.jsonl", rows)
    data_one, data_two = tmp_path / "data1", tmp_path / "data2"
    prepare_data(DataConfig(dataset=str(src), tokenizer=str(tiny_llama), test_size=0.2), data_one, tokenizer=tokenizer)
    shutil.copytree(data_one, data_two)  # same pairs, each with its own (cold) reference cache

    _run(tmp_path, _cfg(tiny_llama, data_one, tmp_path / "runs1" / "run", 8), 1)
    double = _run(tmp_path, _cfg(tiny_llama, data_two, tmp_path / "runs2" / "run", 4), 2)

    one, two = tmp_path / "runs1" / "run", tmp_path / "runs2" / "run"
    losses = lambda run: [h["loss"] for h in json.loads((run / "trainer_state.json").read_text())["log_history"] if "loss" in h]  # noqa: E731
    assert len(losses(one)) == 8 and losses(two) == pytest.approx(losses(one), abs=1e-5)
    w1, w2 = load_file(one / "model" / "model.safetensors"), load_file(two / "model" / "model.safetensors")
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], atol=1e-5, rtol=0, msg=name)

    # Each training pair seen exactly once per epoch across the two ranks, and the ranks got different pairs.
    train_ids = sorted(r["id"] for r in load_prepared(data_two).split("train"))
    batches = {rank: [b["ids"] for b in recs if "ids" in b] for rank, recs in double.items()}
    assert set(batches) == {"rank0", "rank1"}
    per_epoch = len(train_ids) // 8  # optimizer steps per epoch; each rank takes 4 pairs per step
    for epoch in range(2):
        seen = []
        for rank in batches:
            train_batches = [b for b in batches[rank] if set(b) <= set(train_ids)][epoch * per_epoch:(epoch + 1) * per_epoch]
            seen += [i for b in train_batches for i in b]
        assert sorted(seen) == train_ids

    # The reference cache: computed once (rank 0), identical to the single-process cache.
    computed = {rank: sum(r.get("reference_pairs", 0) for r in recs) for rank, recs in double.items()}
    assert computed == {"rank0": 40, "rank1": 0}
    cache1 = json.loads(next((data_one / "refcache").glob("*.json")).read_text())["logps"]
    cache2 = json.loads(next((data_two / "refcache").glob("*.json")).read_text())["logps"]
    assert cache1.keys() == cache2.keys()
    for key in cache1:
        assert cache2[key] == cache1[key]  # same reference batches, so bitwise equal

    # Exactly one run folder, one TensorBoard writer, nothing written twice.
    assert sorted(p.name for p in (tmp_path / "runs2").iterdir()) == ["run"]
    assert len(list((two / "logs").glob("events.out.tfevents.*"))) == 1
    assert json.loads((two / "metrics.json").read_text())["reference_pairs_computed"] == 40


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs" / "accelerate").glob("*.yaml")))
def test_accelerate_configs_parse_and_validate(name):
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.utils import DistributedType

    config = ClusterConfig.from_yaml_file(str(REPO / "configs" / "accelerate" / name))
    assert config.compute_environment.value == "LOCAL_MACHINE"
    assert config.distributed_type in set(DistributedType)
    assert config.num_processes >= 1 and config.mixed_precision in ("no", "bf16", "fp16")
    if config.distributed_type == DistributedType.FSDP:
        assert config.fsdp_config["fsdp_sharding_strategy"] in ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD")
        assert config.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    if config.distributed_type == DistributedType.DEEPSPEED:
        assert config.deepspeed_config["zero_stage"] in (2, 3)
        assert config.deepspeed_config.get("offload_optimizer_device", "none") in ("none", "cpu", "nvme")
    first_line = (REPO / "configs" / "accelerate" / name).read_text().splitlines()[0]
    assert first_line.startswith("# ") and len(first_line) > 20  # a one-line note on when to use it
