"""What a chat-app user waits for with the embedded SmolLM2-135M-Instruct: time to first token and tokens/s.

Each answer goes through `dpolab.generation.stream_text` exactly as the app calls it (worker thread, model lock,
TextIteratorStreamer, the app's torch thread count), greedy, forced to the full 200 new tokens (min_new_tokens) so
every repeat does the same work.
Two prompts: a short question, and the same question after a few earlier turns (~400 prompt tokens, the prefill a
long chat costs). After a warm-up answer, `--repeats` answers each; medians are reported.

  TTFT: from the call until the first text piece arrives (tokenize + prefill + first decode step + the streamer's
        wait for a word boundary), i.e. what the user sees.
  tokens/s: 200 / (time of the last piece - time of the first piece) * (199/200): the decode rate while streaming;
        end-to-end tokens/s (200 / total) is reported too.

Usage: python bench/app_latency.py [--repeats 3] [--tokens 200] [--threads N]   (targets: TTFT < 1 s, >= 10 tokens/s)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

from dpolab import EMBEDDED_MODEL  # noqa: E402
from dpolab.generation import GenerationSettings, build_prompt, stream_text  # noqa: E402

QUESTION = "What is the purpose of life?"
HISTORY = [("user", "How to live a healthy life?"),
           ("assistant", "Eat plenty of vegetables, fruit and whole grains, move every day, sleep seven to nine hours, "
                         "drink water rather than sugary drinks, avoid smoking, keep alcohol low, and stay in touch "
                         "with friends and family. " * 4),
           ("user", "Which of these matters most?"),
           ("assistant", "Sleep and daily movement make the largest difference for most people, because they improve "
                         "mood, energy, weight and long-term health at once. " * 4)]


@dataclass(frozen=True)
class FullLength(GenerationSettings):
    """Never stop before max_new_tokens (EOS suppressed), so repeats and prompts are comparable."""

    def generate_kwargs(self) -> dict:
        return {**super().generate_kwargs(), "min_new_tokens": self.max_new_tokens}


def one_answer(model, tokenizer, prompt: str, settings: GenerationSettings, lock: threading.Lock) -> dict:
    started = time.perf_counter()
    pieces, truncated = stream_text(model, tokenizer, prompt, "qa", settings, stop=threading.Event(), lock=lock)
    first = last = None
    text = []
    for piece in pieces:
        now = time.perf_counter()
        if piece and first is None:
            first = now
        last = now
        text.append(piece)
    with lock:  # the worker releases it once `generate` has returned: no thread left running between repeats
        pass
    n = settings.max_new_tokens
    return {"ttft_s": first - started, "total_s": last - started,
            "decode_tokens_per_s": (n - 1) / (last - first), "end_to_end_tokens_per_s": n / (last - started),
            "chars": len("".join(text)), "truncated": truncated}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: what `dpolab app` uses)")
    args = parser.parse_args()
    import torch

    from dpolab.app.launch import app_threads

    torch.set_num_threads(args.threads or int(os.environ.get("OMP_NUM_THREADS") or app_threads()))
    load_before = os.getloadavg()
    from dpolab.models import load_model, load_tokenizer

    started = time.perf_counter()
    model, tokenizer = load_model(EMBEDDED_MODEL), load_tokenizer(EMBEDDED_MODEL)
    load_s = time.perf_counter() - started
    settings = FullLength(greedy=True, max_new_tokens=args.tokens)
    lock = threading.Lock()
    prompts = {"short": build_prompt(QUESTION, "qa", tokenizer), "long_chat": build_prompt(QUESTION, "qa", tokenizer, HISTORY)}
    one_answer(model, tokenizer, prompts["short"], settings, lock)  # warm-up: first-call allocations, thread pools
    cases = {}
    for name, prompt in prompts.items():
        runs = [one_answer(model, tokenizer, prompt, settings, lock) for _ in range(args.repeats)]
        median = {key: round(statistics.median(r[key] for r in runs), 3)
                  for key in ("ttft_s", "total_s", "decode_tokens_per_s", "end_to_end_tokens_per_s")}
        cases[name] = {"prompt_tokens": len(tokenizer(prompt).input_ids), "median": median,
                       "runs": [{k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()} for r in runs]}
        print(f"{name:10s} prompt {cases[name]['prompt_tokens']:4d} tok: TTFT {median['ttft_s']:.3f} s, "
              f"{median['decode_tokens_per_s']:.1f} tok/s decode, {median['end_to_end_tokens_per_s']:.1f} tok/s end to end",
              flush=True)
    worst = {"ttft_s": max(c["median"]["ttft_s"] for c in cases.values()),
             "decode_tokens_per_s": min(c["median"]["decode_tokens_per_s"] for c in cases.values())}
    result = {
        "settings": {"model": EMBEDDED_MODEL, "dtype": "float32", "template": "qa", "new_tokens": args.tokens,
                     "repeats": args.repeats, "generation": asdict(settings), "min_new_tokens": args.tokens,
                     "path": "dpolab.generation.stream_text (worker thread + TextIteratorStreamer), as the app",
                     "torch_threads": torch.get_num_threads()},
        "model_load_s": round(load_s, 2),
        # Other processes on the machine skew everything (two-thread torch slows ~10x when another holds a core).
        "load_average_1m": {"before": round(load_before[0], 2), "after": round(os.getloadavg()[0], 2)},
        "cases": cases,
        "targets": {"ttft_s_below": 1.0, "tokens_per_s_at_least": 10.0,
                    "met": worst["ttft_s"] < 1.0 and worst["decode_tokens_per_s"] >= 10.0},
    }
    path = write_result("app_latency", result)
    print(json.dumps({"worst_case": worst, "targets_met": result["targets"]["met"]}, indent=2))
    print(f"-> {path}")


if __name__ == "__main__":
    main()
