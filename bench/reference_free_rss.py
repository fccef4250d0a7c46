"""Peak RSS of the reference-free methods (SimPO, CPO, ORPO) against DPO on the same batch, dpolab only, repeated.

Each configuration runs in its own process (its peak is its own), repeats interleaved so drift hits all alike:
  dpo-cold   DPO with an empty reference cache: the reference pass runs before step 1 (its own peak is recorded)
  dpo-warm   DPO with the cache filled by dpo-cold: no reference pass, cached log-probs only
  simpo, cpo, orpo   reference-free: no reference model, pass or cache
Same model (SmolLM2-135M, first --layers layers), same HH pairs, fp32, batch, max_length, β, AdamW, gradient
checkpointing on, as bench/methods_vs_trl.py. Peak RSS is the process's VmHWM; `ref_pass_peak_mb` is VmHWM read
right after the reference pass, so `peak_rss_mb - ref_pass_peak_mb > 0` says the training step, not the pass, set
the process's peak.
Usage: python bench/reference_free_rss.py [--layers 30] [--pairs 16] [--steps 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_flags, proc_status, write_result  # noqa: E402
from dpo_vs_trl import BATCH, BETA, LR, MAX_LENGTH  # noqa: E402
from methods_vs_trl import run_dpolab, workspace  # noqa: E402

CONFIGS = ["dpo-cold", "dpo-warm", "simpo", "cpo", "orpo"]


def _hwm_mb() -> float:
    return proc_status("VmHWM") / 2**20


def child(work: Path, name: str, steps: int) -> None:
    import dpolab.engine.train as train

    phase = {}
    reference_logps = train.reference_logps

    def measured(*args, **kwargs):
        out = reference_logps(*args, **kwargs)
        phase["ref_pass_peak_mb"] = _hwm_mb()
        return out

    train.reference_logps = measured
    result = run_dpolab(work, name.split("-")[0], steps)
    (work / f"{name}.json").write_text(json.dumps({**result, **phase, "peak_rss_mb": _hwm_mb()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=30, help="decoder layers kept of SmolLM2-135M's 30")
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", nargs=2, metavar=("WORK", "NAME"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(Path(args.child[0]), args.child[1], args.steps)
        return
    from dpolab.folders.prepared import PreparedFolder

    work = workspace("dpolab-rss-", args.layers, args.pairs)
    print(f"work dir {work}; SmolLM2-135M first {args.layers} layers; {args.pairs} HH pairs", flush=True)
    runs: dict[str, list[dict]] = {name: [] for name in CONFIGS}
    for repeat in range(args.repeats):
        for name in CONFIGS:
            if name == "dpo-cold":
                shutil.rmtree(PreparedFolder(work / "data").refcache_dir, ignore_errors=True)
            subprocess.run([sys.executable, __file__, "--child", str(work), name, "--steps", str(args.steps)],
                           check=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
            r = json.loads((work / f"{name}.json").read_text())
            r["load"] = os.getloadavg()[0]
            runs[name].append(r)
            print(repeat, name, {k: r.get(k) for k in ("peak_rss_mb", "ref_pass_peak_mb", "reference_pairs_computed",
                                                        "setup_s", "load")}, flush=True)
    dpo = statistics.median(r["peak_rss_mb"] for r in runs["dpo-cold"] + runs["dpo-warm"])
    table = {name: {"peak_rss_mb": [round(r["peak_rss_mb"]) for r in rs],
                    "median_mb": round(statistics.median(r["peak_rss_mb"] for r in rs)),
                    "vs_dpo": round(statistics.median(r["peak_rss_mb"] for r in rs) / dpo, 3),
                    "ref_pass_peak_mb": [round(r["ref_pass_peak_mb"]) for r in rs if "ref_pass_peak_mb" in r],
                    "reference_pairs_computed": [r["reference_pairs_computed"] for r in rs],
                    "setup_s": [round(r["setup_s"], 1) for r in rs]} for name, rs in runs.items()}
    settings = {"model": f"SmolLM2-135M, first {args.layers} of 30 layers", "pairs": args.pairs, "batch": BATCH,
                "steps": args.steps, "repeats": args.repeats, "max_length": MAX_LENGTH, "beta": BETA,
                "learning_rate": LR, "precision": "fp32", "gradient_checkpointing": True, "cpu_flags": cpu_flags()}
    path = write_result("reference_free_rss", {"settings": settings, "table": table, "raw": runs})
    print(f"{'config':<10}{'peak RSS MB (each run)':<26}{'median':>8}{'x DPO':>7}  reference pass peak MB")
    for name, row in table.items():
        print(f"{name:<10}{' / '.join(map(str, row['peak_rss_mb'])):<26}{row['median_mb']:>8}{row['vs_dpo']:>7.3f}  "
              f"{' / '.join(map(str, row['ref_pass_peak_mb'])) or '-'}")
    print(f"-> {path}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
