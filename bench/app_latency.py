"""What chat-app users wait for with the embedded SmolLM2-135M-Instruct: time to first token and tokens/s, alone
and several at once.

Single user: each answer goes through `dpolab.serving.DecodeEngine` exactly as the app calls it (the app's torch
thread count), greedy, forced to the full `--tokens` new tokens (min_new_tokens) so every repeat does the same work.
Two prompts: a short question, and the same question after a few earlier turns (~400 prompt tokens, the prefill a
long chat costs). After a warm-up answer, `--repeats` answers each; medians are reported.

Load table: 1, 2 and 4 users ask at the same moment (one thread each, different questions), `--rounds` times, with
  batched:    the app's engine (continuous batching, --max-batch 4: all of them decode together), and
  serialized: the engine the app had before, `dpolab.generation.stream_text`, `model.generate` under one lock per
              model (one answer at a time, the others wait with nothing to show),
side by side in one run. Per user: TTFT (asking -> first text), tokens/s while its answer streams; per round: total
tokens/s = all new tokens / (last answer's end - the asking moment). p50/p95 over users x rounds.

  TTFT: from the call until the first text piece arrives (tokenize + prefill + first decode step), what the user sees.
  tokens/s: (n - 1) / (time of the last piece - time of the first piece): the decode rate while streaming.

Usage: python bench/app_latency.py [--repeats 3] [--tokens 128] [--rounds 3] [--threads N]
Targets: TTFT < 1 s and >= 10 tokens/s alone; at 2 users batched total tokens/s >= 1.5x serialized, p95 TTFT <= 1.5 s.
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
from dpolab.serving import DecodeEngine, Text  # noqa: E402

QUESTION = "What is the purpose of life?"
QUESTIONS = ["What is the purpose of life?", "How to live a healthy life?", "How do I make good tea?",
             "Tips for a job interview?"]
HISTORY = [("user", "How to live a healthy life?"),
           ("assistant", "Eat plenty of vegetables, fruit and whole grains, move every day, sleep seven to nine hours, "
                         "drink water rather than sugary drinks, avoid smoking, keep alcohol low, and stay in touch "
                         "with friends and family. " * 4),
           ("user", "Which of these matters most?"),
           ("assistant", "Sleep and daily movement make the largest difference for most people, because they improve "
                         "mood, energy, weight and long-term health at once. " * 4)]


@dataclass(frozen=True)
class FullLength(GenerationSettings):
    """Never stop before max_new_tokens (EOS suppressed) in `generate`, so repeats and prompts are comparable."""

    def generate_kwargs(self) -> dict:
        return {**super().generate_kwargs(), "min_new_tokens": self.max_new_tokens}


def timed(pieces, started: float, n: int) -> dict:
    first = last = None
    for piece in pieces:
        now = time.perf_counter()
        if piece and first is None:
            first = now
        last = now
    return {"ttft_s": first - started, "total_s": last - started, "end": last,
            "decode_tokens_per_s": (n - 1) / (last - first), "end_to_end_tokens_per_s": n / (last - started)}


def batched_answer(engine: DecodeEngine, prompt: str, settings: GenerationSettings, started: float) -> dict:
    request = engine.submit(prompt, "qa", settings, min_new_tokens=settings.max_new_tokens)
    return timed((e.piece for e in request if isinstance(e, Text)), started, settings.max_new_tokens)


def serialized_answer(model, tokenizer, lock: threading.Lock, prompt: str, settings: FullLength, started: float) -> dict:
    pieces, _ = stream_text(model, tokenizer, prompt, "qa", settings, stop=threading.Event(), lock=lock)
    result = timed(pieces, started, settings.max_new_tokens)
    with lock:  # the worker releases it once `generate` has returned: no thread left running between rounds
        pass
    return result


def one_round(answer, prompts: list[str]) -> dict:
    """All users ask at the same moment; each gets its own thread."""
    results: list[dict] = [{} for _ in prompts]
    started = time.perf_counter()

    def user(index: int) -> None:
        results[index] = answer(prompts[index], started)

    threads = [threading.Thread(target=user, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"users": results, "wall_s": max(r["end"] for r in results) - started}


def p(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]


def load_table(model, tokenizer, tokens: int, rounds: int, max_batch: int) -> dict:
    settings = FullLength(greedy=True, max_new_tokens=tokens)
    engine = DecodeEngine(model, tokenizer, max_batch=max_batch)
    lock = threading.Lock()
    answers = {"batched": lambda prompt, started: batched_answer(engine, prompt, settings, started),
               "serialized": lambda prompt, started: serialized_answer(model, tokenizer, lock, prompt, settings, started)}
    table = {}
    for users in (1, 2, 4):
        prompts = [build_prompt(QUESTIONS[i % len(QUESTIONS)], "qa", tokenizer) for i in range(users)]
        for kind, answer in answers.items():  # side by side, alternating, so a noisy moment hits both
            load_before = os.getloadavg()[0]
            runs = [one_round(answer, prompts) for _ in range(rounds)]
            ttft = [u["ttft_s"] for r in runs for u in r["users"]]
            per_user = [u["decode_tokens_per_s"] for r in runs for u in r["users"]]
            total = [users * tokens / r["wall_s"] for r in runs]
            row = {"users": users, "engine": kind, "ttft_p50_s": round(p(ttft, 0.5), 3),
                   "ttft_p95_s": round(p(ttft, 0.95), 3), "tokens_per_s_per_user_p50": round(p(per_user, 0.5), 2),
                   "total_tokens_per_s_median": round(statistics.median(total), 2),
                   "load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2)}
            table[f"{users}-{kind}"] = row
            print(f"{users} users {kind:10s}: TTFT p50 {row['ttft_p50_s']:.2f} s p95 {row['ttft_p95_s']:.2f} s, "
                  f"{row['tokens_per_s_per_user_p50']:.1f} tok/s per user, {row['total_tokens_per_s_median']:.1f} "
                  f"tok/s total (load {row['load_before']} -> {row['load_after']})", flush=True)
    engine.close()
    for users in (1, 2, 4):
        b, s = table[f"{users}-batched"], table[f"{users}-serialized"]
        b["total_vs_serialized"] = round(b["total_tokens_per_s_median"] / s["total_tokens_per_s_median"], 2)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=128, help="new tokens per answer (the app's default)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per row of the load table")
    parser.add_argument("--max-batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: what `dpolab app` uses)")
    args = parser.parse_args()
    import torch

    from dpolab.app.launch import app_threads

    torch.set_num_threads(args.threads or int(os.environ.get("OMP_NUM_THREADS") or app_threads()))
    load_before = os.getloadavg()
    from dpolab.models import load_model, load_tokenizer

    started = time.perf_counter()
    model, tokenizer = load_model(EMBEDDED_MODEL).eval(), load_tokenizer(EMBEDDED_MODEL)
    load_s = time.perf_counter() - started
    settings = GenerationSettings(greedy=True, max_new_tokens=args.tokens)
    engine = DecodeEngine(model, tokenizer, max_batch=args.max_batch)
    prompts = {"short": build_prompt(QUESTION, "qa", tokenizer), "long_chat": build_prompt(QUESTION, "qa", tokenizer, HISTORY)}
    batched_answer(engine, prompts["short"], settings, time.perf_counter())  # warm-up: allocations, thread pools
    cases = {}
    for name, prompt in prompts.items():
        runs = []
        for _ in range(args.repeats):
            runs.append(batched_answer(engine, prompt, settings, time.perf_counter()))
            runs[-1].pop("end")
        median = {key: round(statistics.median(r[key] for r in runs), 3)
                  for key in ("ttft_s", "total_s", "decode_tokens_per_s", "end_to_end_tokens_per_s")}
        cases[name] = {"prompt_tokens": len(tokenizer(prompt).input_ids), "median": median,
                       "runs": [{k: round(v, 3) for k, v in r.items()} for r in runs]}
        print(f"{name:10s} prompt {cases[name]['prompt_tokens']:4d} tok: TTFT {median['ttft_s']:.3f} s, "
              f"{median['decode_tokens_per_s']:.1f} tok/s decode, {median['end_to_end_tokens_per_s']:.1f} tok/s end to end",
              flush=True)
    engine.close()
    table = load_table(model, tokenizer, args.tokens, args.rounds, args.max_batch)
    worst = {"ttft_s": max(c["median"]["ttft_s"] for c in cases.values()),
             "decode_tokens_per_s": min(c["median"]["decode_tokens_per_s"] for c in cases.values())}
    two = table["2-batched"]
    result = {
        "settings": {"model": EMBEDDED_MODEL, "dtype": "float32", "template": "qa", "new_tokens": args.tokens,
                     "repeats": args.repeats, "rounds": args.rounds, "max_batch": args.max_batch,
                     "generation": asdict(settings), "min_new_tokens": args.tokens,
                     "path": "dpolab.serving.DecodeEngine, as the app; serialized = dpolab.generation.stream_text",
                     "torch_threads": torch.get_num_threads()},
        "model_load_s": round(load_s, 2),
        # Other processes on the machine skew everything (two-thread torch slows ~10x when another holds a core).
        "load_average_1m": {"before": round(load_before[0], 2), "after": round(os.getloadavg()[0], 2)},
        "cases": cases,
        "load_table": table,
        "targets": {"ttft_s_below": 1.0, "tokens_per_s_at_least": 10.0,
                    "two_users_total_vs_serialized_at_least": 1.5, "two_users_ttft_p95_s_at_most": 1.5,
                    "met": worst["ttft_s"] < 1.0 and worst["decode_tokens_per_s"] >= 10.0
                    and two["total_vs_serialized"] >= 1.5 and two["ttft_p95_s"] <= 1.5},
    }
    path = write_result("app_latency", result)
    print(json.dumps({"worst_case": worst, "two_users": two, "targets_met": result["targets"]["met"]}, indent=2))
    print(f"-> {path}")


if __name__ == "__main__":
    main()
