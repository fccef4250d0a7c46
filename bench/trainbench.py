"""What the training benchmarks (dpo_vs_trl.py, scaling.py) share: one configuration = one subprocess (its peak RSS is
its own), the measurements that make a figure trustworthy, and the useful-FLOPs arithmetic.

Trust, per configuration:
  peak      the fp32 matmul peak (2048² GEMMs) measured right before the configuration runs, best of --peak-tries;
            MFU divides by the best of every peak measured in the run (load can only lower a peak). The bf16 peak is
            measured only where bf16 is native (AVX512-BF16/AMX, CUDA) and only for a bf16 configuration.
  load      /proc/loadavg before and after, and the CPU time other processes took while it ran: busy + stolen
            ticks of /proc/stat minus this process's and its children's own CPU time, per second of wall time
            ("foreign cores"). The 1-minute load average lags (right after one configuration it still shows that
            configuration's own load), so the flag rests on foreign cores: above --max-foreign a configuration is
            flagged "under load" and left out of the headline ratios.
  steps     a timestamp at each optimizer step's end (transformers' callback handler, same for TRL and dpolab):
            pairs/s = pairs trained / the trainer's train_runtime; the steady step time (steps after the first) is
            recorded beside it.
Useful model FLOPs per pair = 6·N_body·(P+C+R) + 6·d·V·(C+R): the policy's forward+backward over the pair's unique
tokens (attention-score FLOPs left out, so MFU is a lower bound that drops as sequences grow), the LM head only where
a label counts. Token efficiency = unique tokens (P+C+R) / tokens computed (padding, repeated prompts included).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from common import cpu_flags  # the benches also read it as tb.cpu_flags

TICK = os.sysconf("SC_CLK_TCK")


def native_bf16() -> bool:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_capability(0) >= (8, 0)
    return bool({"avx512_bf16", "amx_bf16"} & set(cpu_flags()))


def matmul_peak(dtype_name: str = "float32", tries: int = 3, n: int = 2048, repeats: int = 8) -> float:
    """Best of `tries` timings of `repeats` n×n GEMMs, in FLOP/s (torch's threads as the trainers use them)."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    best = 0.0
    for _ in range(tries + 1):  # the first is a warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(repeats):
            a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * n**3 * repeats / (time.perf_counter() - started))
    return best


def _ticks() -> int:
    """Busy + stolen ticks of all CPUs since boot (user nice system irq softirq steal; idle and iowait left out)."""
    fields = [int(x) for x in open("/proc/stat").readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return user + nice + system + irq + softirq + steal


def _own_cpu_s() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run_child(script: Path, spec: dict, work: Path, timeout: float | None = None) -> dict:
    """Run one configuration in a subprocess (`script --child SPEC OUT`), watched: its result plus load facts."""
    out = work / f"{spec['name']}.json"
    out.unlink(missing_ok=True)
    load_before, ticks, own, started = os.getloadavg(), _ticks(), _own_cpu_s(), time.perf_counter()
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    try:
        proc = subprocess.run([sys.executable, str(script), "--child", json.dumps(spec), str(out)], env=env,
                              timeout=timeout, capture_output=True, text=True)
        error = None if proc.returncode == 0 else f"exit {proc.returncode}: " + (proc.stderr.strip().splitlines()
                                                                               or ["(no output)"])[-1][:300]
    except subprocess.TimeoutExpired:
        error = f"ran past {timeout:.0f} s"
    wall = time.perf_counter() - started
    foreign = ((_ticks() - ticks) / TICK - (_own_cpu_s() - own)) / wall
    result = json.loads(out.read_text()) if error is None else {"error": error}
    result["watch"] = {"wall_s": round(wall, 2), "load_before": load_before,
                       "load_after": os.getloadavg(), "foreign_cores": round(max(foreign, 0.0), 3)}
    return result


def step_clock() -> list[float]:
    """Timestamps of train begin and every optimizer step's end, for whichever Trainer runs in this process."""
    from transformers import trainer_callback

    stamps: list[float] = []
    handler = trainer_callback.CallbackHandler
    begin, end = handler.on_train_begin, handler.on_step_end

    def on_train_begin(self, *args, **kwargs):
        stamps.append(time.perf_counter())
        return begin(self, *args, **kwargs)

    def on_step_end(self, *args, **kwargs):
        stamps.append(time.perf_counter())
        return end(self, *args, **kwargs)

    handler.on_train_begin, handler.on_step_end = on_train_begin, on_step_end
    return stamps


def step_times(stamps: list[float]) -> dict:
    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"step_s": [round(s, 3) for s in steps],
            "steady_step_s": round(sum(steps[1:]) / len(steps[1:]), 3) if len(steps) > 1 else None}


def data_facts(model_dir: Path, data_dir: Path) -> dict:
    """Shape and token counts of a prepared data folder's train split, for useful FLOPs and token efficiency."""
    from transformers import AutoConfig

    from dpolab.data.prepare import load_prepared

    config = AutoConfig.from_pretrained(model_dir)
    recs = load_prepared(data_dir).split("train")
    unique = sum(len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in recs)
    response = sum(len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in recs)
    n_body = body_params(config)
    flops = (6 * n_body * unique + 6 * config.hidden_size * config.vocab_size * response) / len(recs)
    return {"pairs": len(recs), "unique_tokens_per_pair": unique / len(recs), "useful_flops_per_pair": flops,
            "body_params": n_body, "hidden": config.hidden_size, "vocab": config.vocab_size}


def body_params(config) -> int:
    """Parameters of the decoder body (embeddings and LM head left out), from the config alone (no weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for n, p in model.named_parameters() if "embed" not in n and "lm_head" not in n)


def rates(result: dict, facts: dict, batch: int, peak_flops: float | None, steady: bool = False) -> dict:
    """pairs/s, useful and computed tokens/s, token efficiency, MFU of one configuration's result. steady: pairs/s
    from the steps after the first (its warm-up left out; per-pair FLOPs still the average over all the pairs)."""
    pairs = result["steps"] * batch
    pps = batch / result["steady_step_s"] if steady and result.get("steady_step_s") else pairs / result["train_s"]
    return {"pairs_per_s": pps, "useful_tokens_per_s": pps * facts["unique_tokens_per_pair"],
            "computed_tokens_per_s": result["computed_tokens"] / result["train_s"],
            "token_efficiency": facts["unique_tokens_per_pair"] * pairs / result["computed_tokens"],
            "mfu": pps * facts["useful_flops_per_pair"] / peak_flops if peak_flops else None}


def under_load(result: dict, max_foreign: float) -> bool:
    return result["watch"]["foreign_cores"] > max_foreign


def trl_records(data_dir: Path) -> list[dict]:
    from dpolab.data.prepare import load_prepared

    # TRL appends EOS itself: hand it the texts without it, rendered exactly as dpolab rendered them.
    return [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]}
            for r in load_prepared(data_dir).split("train")]


def run_trl(spec: dict) -> dict:
    """TRL's DPOTrainer on the spec's model and data; precision "default" leaves TRL's own default (bf16)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    stamps = step_clock()
    dataset = Dataset.from_list(trl_records(Path(spec["data"])))
    kwargs = {} if spec["precision"] == "default" else {"bf16": spec["precision"] == "bf16"}
    args = DPOConfig(output_dir=str(Path(spec["work"]) / spec["name"]), per_device_train_batch_size=spec["batch"],
                     max_steps=spec["steps"], learning_rate=spec["lr"], beta=spec["beta"], max_length=spec["max_length"],
                     gradient_checkpointing=spec["gradient_checkpointing"], use_cpu=not torch.cuda.is_available(),
                     report_to="none", save_strategy="no", logging_steps=1, seed=spec["seed"],
                     dataloader_num_workers=0, lr_scheduler_type="linear",
                     precompute_ref_log_probs=spec["precompute"], **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    started = time.perf_counter()
    trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    computed = []
    collate = trainer.data_collator
    trainer.data_collator = lambda features, *a, **k: _counted(collate(features, *a, **k), computed)
    setup_s = time.perf_counter() - started
    out = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"train_s": out.metrics["train_runtime"], "setup_s": setup_s, "steps": out.global_step, "losses": losses,
            "computed_tokens": sum(computed), **step_times(stamps)}


def _counted(batch, computed: list):
    computed.append(batch["input_ids"].numel())
    return batch


def run_dpolab(spec: dict) -> dict:
    """dpolab's run_training (what `dpolab train` runs) with the spec's settings; the rest at dpolab's defaults."""
    import shutil

    from dpolab.config import DataConfig, TrainConfig
    from dpolab.engine import trainer as trainer_module
    from dpolab.engine.train import run_training

    if spec.get("cold"):
        shutil.rmtree(Path(spec["data"]) / "refcache", ignore_errors=True)
    stamps, computed = step_clock(), []
    original = trainer_module.DPOCollator.__call__

    def counting(self, features, with_ref=True):
        batch = original(self, features, with_ref)
        if with_ref:
            computed.append(batch["computed_tokens"])
        return batch

    trainer_module.DPOCollator.__call__ = counting
    options = {k: spec[k] for k in ("layout", "gradient_checkpointing", "precision", "attention", "token_budget")
               if spec.get(k) is not None}
    cfg = TrainConfig(output_dir=Path(spec["work"]) / spec["name"], model=spec["model"],
                      data=DataConfig(dataset=spec["data"]), batch_size=spec["batch"], max_steps=spec["steps"],
                      learning_rate=spec["lr"], beta=spec["beta"], eval_every="no", save_every="steps",
                      save_steps=10**6, report_to=[], logging_steps=1, seed=spec["seed"], **options)
    result = run_training(cfg, overwrite=True)
    history = json.loads((Path(spec["work"]) / spec["name"] / "trainer_state.json").read_text())["log_history"]
    memory = result.metrics.get("memory") or {}
    return {"train_s": result.metrics["train_runtime_s"],
            "setup_s": result.metrics["total_time_s"] - result.metrics["train_runtime_s"],
            "steps": result.metrics["global_step"], "losses": [h["loss"] for h in history if "loss" in h],
            "computed_tokens": sum(computed), "reference_pairs_computed": result.ref_pairs_computed,
            "precision": str(result.metrics.get("precision")), "gradient_checkpointing": memory.get("gradient_checkpointing"),
            **step_times(stamps)}


def parse_args(parser):
    """Add the options of a configuration's subprocess and parse; in that subprocess (--child) run it and exit."""
    import argparse

    parser.add_argument("--child", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--work", help="working folder (default: a new temporary one)")
    args = parser.parse_args()
    if args.child:
        child_main(*args.child)
        sys.exit(0)
    return args


def child_main(spec_json: str, out: str) -> None:
    """Entry of a configuration's subprocess: run it, add its own peak RSS, write the result."""
    import shutil

    spec = json.loads(spec_json)
    result = run_trl(spec) if spec["kind"] == "trl" else run_dpolab(spec)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    shutil.rmtree(Path(spec["work"]) / spec["name"], ignore_errors=True)  # checkpoints/exports: not measured
    Path(out).write_text(json.dumps(result))
