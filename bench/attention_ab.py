"""The packed layout's two CPU attentions A/B, interleaved: `sdpa` (balanced rows, one SDPA per row with the dense
mask) against `pairs` (one unpadded row, SDPA pair by pair: engine/pair_attention.py), one forward+backward through
dpolab's path (batch_logps, the fused head) of the same batches, in one process, alternating which goes first, so
both see the same machine state. The real embedded SmolLM2-135M (all 30 layers), fp32, no checkpointing, HH pairs
(raw template, pairs that fit 512 tokens: dpo_vs_trl.py's set), --batch pairs per batch.
Usage: python bench/attention_ab.py [--pairs 32] [--batch 8] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import trainbench as tb  # noqa: E402
from common import HH_DATA, write_result  # noqa: E402


def hh_fit(work: Path, n: int) -> list[dict]:
    from dpolab.config import DataConfig
    from dpolab.data.prepare import load_prepared, prepare_data

    prepare_data(DataConfig(dataset=str(HH_DATA), template="raw", test_size=0.0, max_length=512), work / "hh")
    return [r for r in load_prepared(work / "hh").split("train")
            if len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) <= 512][:n]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from dpolab.engine import flex
    from dpolab.engine.layout import packed_batch
    from dpolab.engine.logprobs import batch_logps
    from dpolab.models import embedded_model_dir

    records = hh_fit(Path(tempfile.mkdtemp(prefix="dpolab-ab-")), args.pairs)
    model = AutoModelForCausalLM.from_pretrained(embedded_model_dir(), dtype=torch.float32, attn_implementation="sdpa")
    groups = [records[i : i + args.batch] for i in range(0, len(records), args.batch)]
    times: dict[str, list[float]] = {"sdpa": [], "pairs": []}
    load_before = os.getloadavg()
    for repeat in range(args.repeats + 1):  # the first round warms both up and is not counted
        for group in groups:
            for name in ("sdpa", "pairs") if repeat % 2 == 0 else ("pairs", "sdpa"):
                batch = packed_batch(group, 0, 1024, attention=name)
                flex.use_attention(model, name)
                model.zero_grad(set_to_none=True)
                started = time.perf_counter()
                batch_logps(model, batch).sum().backward()
                if repeat:
                    times[name].append(round(time.perf_counter() - started, 3))
    total = {name: round(sum(t), 2) for name, t in times.items()}
    settings = {**vars(args), "model": "SmolLM2-135M-Instruct (embedded), fp32", "cpu_flags": tb.cpu_flags(),
                "load_before": load_before, "load_after": os.getloadavg()}
    path = write_result("attention_ab", {"settings": settings, "seconds": times, "total_s": total,
                                         "pairs_vs_sdpa": total["pairs"] / total["sdpa"]})
    print(total, f"pairs/sdpa {total['pairs'] / total['sdpa']:.3f}", f"-> {path}")


if __name__ == "__main__":
    main()
