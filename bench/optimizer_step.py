"""AdamW's step on SmolLM2-135M's parameter shapes: torch's three implementations side by side, interleaved.

  foreach   `adamw_torch` (transformers' optimizer name): the multi-tensor kernels, which hold a temporary the size
            of the parameters (sqrt of exp_avg_sq) during the step
  fused     `adamw_torch_fused` (transformers' default for torch >= 2.8, TRL's, and dpolab's): one kernel per
            parameter, in place
  for-loop  foreach=False: one parameter at a time, op by op
Random fp32 parameters and gradients of the model's shapes (embedding 49152×576, 30 decoder layers), lr 5e-6, weight
decay 0. Each implementation in its own subprocess (its own peak RSS: VmHWM minus the RSS once parameters, gradients
and the optimizer's state exist), rounds alternating the order; the first step (which creates the state) is not
timed. The updates of the three agree (max |Δ| between fused and foreach reported).
Usage: python bench/optimizer_step.py [--steps 5] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import trainbench as tb  # noqa: E402
from common import proc_status, write_result  # noqa: E402

KINDS = {"foreach": {"foreach": True}, "fused": {"fused": True}, "for-loop": {"foreach": False}}
LAYER = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536), (576,), (576,)]


def child(kind: str, steps: int) -> dict:
    import torch

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape) * 0.02) for shape in [(49152, 576)] + LAYER * 30 + [(576,)]]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    optimizer = torch.optim.AdamW(params, lr=5e-6, weight_decay=0.0, **KINDS[kind])
    optimizer.step()  # creates exp_avg / exp_avg_sq
    before = proc_status("VmRSS")
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - started)
    return {"params": sum(p.numel() for p in params), "step_s": [round(t, 4) for t in times],
            "best_s": round(min(times), 4), "step_peak_mb": round((proc_status("VmHWM") - before) / 2**20, 1),
            "checksum": [round(float(p.double().sum()), 9) for p in params[:3]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps)))
        return
    runs: dict[str, list[dict]] = {kind: [] for kind in KINDS}
    load_before = os.getloadavg()
    for round_ in range(args.rounds):
        for kind in KINDS if round_ % 2 == 0 else list(KINDS)[::-1]:
            out = subprocess.run([sys.executable, __file__, "--child", kind, "--steps", str(args.steps)],
                                 check=True, capture_output=True, text=True).stdout
            runs[kind].append(json.loads(out.strip().splitlines()[-1]))
            print(kind, runs[kind][-1]["best_s"], "s", runs[kind][-1]["step_peak_mb"], "MB", flush=True)
    best = {kind: min(r["best_s"] for r in rs) for kind, rs in runs.items()}
    agree = max(abs(a - b) for a, b in zip(runs["fused"][0]["checksum"], runs["foreach"][0]["checksum"]))
    settings = {**vars(args), "cpu_flags": tb.cpu_flags(), "load_before": load_before, "load_after": os.getloadavg()}
    settings.pop("child")
    path = write_result("optimizer_step", {"settings": settings, "runs": runs, "best_step_s": best,
                                           "foreach_vs_fused": best["foreach"] / best["fused"],
                                           "max_checksum_diff_fused_vs_foreach": agree})
    print(best, f"foreach/fused {best['foreach'] / best['fused']:.2f}", f"-> {path}")


if __name__ == "__main__":
    main()
