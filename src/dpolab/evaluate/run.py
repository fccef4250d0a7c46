"""`run_eval(options) -> eval dict`: held-out preference metrics, base-vs-tuned generations, optional judge, report.

Writes RUN/eval/ (or --out): eval.json (every number), report.md, report.html (self-contained), *.png.
Deterministic: fixed seeds for the prompt sample and for each generation.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from dpolab.data.prepare import Prepared, build, is_prepared, load_prepared
from dpolab.errors import DataError, EvalError
from dpolab.evaluate import metrics as M
from dpolab.folders.info import RunInfo, load_run_info
from dpolab.generation import GenerationSettings, build_prompt, generate_text
from dpolab.models import check_model_folder, context_length

STUDY_PROMPTS = ("What is the purpose of life?", "How to live a healthy life?")




@dataclass(frozen=True)
class EvalOptions:
    target: str
    reference: str | None = None
    data: str | None = None
    prompts: Path | None = None
    n_prompts: int = 4
    max_new_tokens: int = 64
    seed: int = 0
    judge: str | None = None
    out: Path | None = None
    beta: float | None = None
    batch_size: int = 8


def load_prompts(path: Path) -> list[str]:
    """One prompt per line (.txt), or JSONL objects with a 'prompt' string."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"prompt file not found: {path}")
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                raise EvalError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            if not isinstance(value, dict) or not isinstance(value.get("prompt"), str) or not value["prompt"].strip():
                raise EvalError(f"{path}:{number}: expected an object with a non-empty 'prompt' string")
            prompts.append(value["prompt"])
        else:
            prompts.append(line.strip())
    if not prompts:
        raise EvalError(f"{path} holds no prompts")
    return prompts


def _data(info: RunInfo, opts: EvalOptions, tokenizer) -> tuple[list[dict], Prepared | None]:
    source = opts.data
    if source is None and info.run_dir is not None:
        dataset = (info.config or {}).get("data", {}).get("dataset")
        source = dataset if dataset and is_prepared(dataset) else str(info.run.data_dir)
    if source is None:
        raise EvalError(f"{opts.target} is not a run folder: pass --data (a prepared folder or a raw source)")
    if is_prepared(source):
        prepared = load_prepared(source)
        return prepared.split("test"), prepared
    from dpolab.config import DataConfig

    try:
        _, test, _, _ = build(DataConfig(dataset=source, tokenizer=info.model, template=info.template), tokenizer)
    except DataError as exc:
        raise EvalError(str(exc)) from None
    return test, None


def policy_logps(model, records: list[dict], collate, batch_size: int) -> tuple[list[float], list[float]]:
    """(chosen, rejected) log-probs per record, by the same batched pass that fills the reference cache."""
    from dpolab.engine.refcache import compute_logps

    logps = compute_logps(model, records, collate, batch_size, model.device, progress=False)
    return [logps[r["id"]][0] for r in records], [logps[r["id"]][1] for r in records]


def _reference_logps(reference: str, records, prepared: Prepared | None, collate, batch_size, model_loader):
    from dpolab.engine import refcache
    from dpolab.models import weights_fingerprint

    if prepared is None:
        return policy_logps(model_loader(), records, collate, batch_size)
    path = refcache.cache_path(prepared.path, weights_fingerprint(reference), torch.float32)
    cached, _ = refcache.ensure_reference(records, path, model_loader, collate, batch_size, "cpu",
                                          {"reference": reference})
    return [cached[r["id"]][0] for r in records], [cached[r["id"]][1] for r in records]


def _prompt_set(opts: EvalOptions, custom: list[str] | None, records: list[dict], template: str, tokenizer) -> list[dict[str, str]]:
    if custom is not None:
        return [{"question": q, "prompt": build_prompt(q, template, tokenizer)} for q in custom]
    sample = random.Random(opts.seed).sample(records, min(opts.n_prompts, len(records)))
    chosen = [{"question": json.loads(r["messages"])[-1][1], "prompt": r["prompt"]} for r in sample]
    return chosen + [{"question": q, "prompt": build_prompt(q, template, tokenizer)} for q in STUDY_PROMPTS]


@dataclass(frozen=True)
class Judge:
    """A loaded reward model. `template` is set for a judge dpolab trained (a reward run): it then scores exactly what
    it was trained on, the prompt in its template + the answer + EOS. Any other judge scores (question, answer) as
    a text pair, the convention of sequence-classification reward models on the Hub."""

    name: str
    tokenizer: Any
    model: Any
    template: str | None = None


def _judge_folder(judge: str) -> tuple[str, str | None]:
    """(loadable path or Hub id, template of a dpolab reward model or None), through the run-folder layout: a run
    folder (or sweep folder) resolves to its model/, and a run that is not a reward model is refused."""
    from dpolab.errors import ModelNotFound

    try:
        info = load_run_info(judge)
    except ModelNotFound as exc:
        raise ModelNotFound(f"--judge {judge}: {exc}") from None
    if info.run_dir is not None and info.method != "reward":
        raise EvalError(f"--judge {judge}: {info.run_dir} is a dpolab {info.method} run, not a reward model; pass a "
                        "reward run (dpolab train --method reward) or a sequence-classification model")
    # A reward model dpolab trained records its template (run config or model/dpolab.json), also when its model/
    # folder is passed directly or exported.
    return info.model, (info.template if info.method == "reward" else None)


def _check_judge_config(judge: str, path: str) -> None:
    """A causal LM would load as a sequence classifier with a freshly initialised (random) score head: refuse it."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    kinds = config.architectures or []
    if not any(kind.endswith("ForSequenceClassification") for kind in kinds):
        held = ", ".join(kinds) or "a model with no recorded architecture"
        raise EvalError(f"--judge {judge}: {path} holds {held}, not a sequence-classification reward model")
    if config.num_labels != 1:
        raise EvalError(f"--judge {judge}: {path} has {config.num_labels} outputs; a reward model has one "
                        "(num_labels=1)")


def load_judge(judge: str) -> Judge:
    """The judge, loaded before any generation so that one that cannot be loaded fails at once, in one line."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path, template = _judge_folder(judge)
    try:
        _check_judge_config(judge, path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(path, use_safetensors=True).eval()
    except (OSError, ValueError) as exc:
        if isinstance(exc, EvalError):
            raise
        raise EvalError(f"--judge {judge}: cannot load a reward model ({str(exc).splitlines()[0][:200]})") from None
    return Judge(judge, tokenizer, model, template)


@torch.no_grad()
def judge_score(judge: Judge, question: str, answer: str) -> float:
    """The judge's scalar score of one answer (the pooled output of its one-output head)."""
    tok = judge.tokenizer
    if judge.template is None:
        inputs = tok(question, answer, return_tensors="pt", truncation=True, max_length=512)
        return float(judge.model(**inputs).logits[0, -1])
    from dpolab.data.tokenize import with_eos

    prompt = build_prompt(question, judge.template, tok)
    ids = tok(prompt, add_special_tokens=judge.template != "chat").input_ids
    ids += with_eos(tok(answer, add_special_tokens=False).input_ids, tok.eos_token_id)
    limit = context_length(judge.model.config) or 2048  # keep the answer's end: the score is read at the last token
    return float(judge.model(input_ids=torch.tensor([ids[-limit:]])).logits[0, -1])


def _judge(judge: str, loaded: Judge, generations: list[dict], seed: int = 0) -> dict[str, Any]:
    tuned = [judge_score(loaded, g["question"], g["tuned"]) for g in generations]
    base = [judge_score(loaded, g["question"], g["base"]) for g in generations]
    for g, t, b in zip(generations, tuned, base):
        g["judge_tuned"], g["judge_base"] = t, b
    summary = M.judge_summary(tuned, base, [g["tuned_tokens"] for g in generations],
                              [g["base_tokens"] for g in generations], seed=seed)
    return {"model": judge, **summary}


def _generations(items: list[dict], load_base, tuned, tokenizer, template: str, settings) -> list[dict]:
    from tqdm.auto import tqdm

    out = []
    for item in tqdm(items, desc="generations", unit="prompt", leave=False):
        base_text = generate_text(load_base(), tokenizer, item["prompt"], template, settings)
        tuned_text = generate_text(tuned, tokenizer, item["prompt"], template, settings)
        out.append({**item, "base": base_text, "tuned": tuned_text,
                    "base_tokens": len(tokenizer(base_text, add_special_tokens=False).input_ids),
                    "tuned_tokens": len(tokenizer(tuned_text, add_special_tokens=False).input_ids)})
    return out


def _collator(tokenizer, records: list[dict]):
    from dpolab.engine.trainer import DPOCollator

    widest = max(len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in records)
    return DPOCollator("packed", tokenizer.pad_token_id, max(2 * widest, 512))


def _open(opts: EvalOptions) -> tuple[RunInfo, str]:
    """The run to evaluate and its reference, checked before any heavy work."""
    info = load_run_info(opts.target)
    check_model_folder(info.model)
    reference = opts.reference or info.base_model
    if reference is None:
        raise EvalError(f"{opts.target} does not record its starting model: pass --reference MODEL")
    return info, reference


def _metrics(method: str, records: list[dict], pc, pr, rc, rr, beta: float) -> dict[str, Any]:
    """Held-out metrics in the method's own terms (rewards as its paper and TRL report them)."""
    if method == "kto" or "label" in records[0]:
        labels = [bool(r["label"]) for r in records]
        return {"metrics": {"policy": M.unpaired_metrics(pc, rc, labels, beta)},
                "margins": [beta * (p - r) for p, r in zip(pc, rc)]}
    counts = ([len(r["chosen_ids"]) for r in records], [len(r["rejected_ids"]) for r in records])
    return {"metrics": {"policy": M.preference_metrics(pc, pr, rc, rr, beta, method, *counts)},
            "margins": M.reward_margins(pc, pr, rc, rr, beta, method, *counts)}


def run_eval(opts: EvalOptions) -> dict[str, Any]:
    from dpolab.models import load_model, load_tokenizer

    started = time.perf_counter()
    custom_prompts = load_prompts(opts.prompts) if opts.prompts is not None else None  # fail before heavy work
    info, reference = _open(opts)
    judge = load_judge(opts.judge) if opts.judge else None
    beta = opts.beta or info.beta or 0.1
    tokenizer = load_tokenizer(info.model)
    records, prepared = _data(info, opts, tokenizer)
    if not records:
        raise EvalError("the evaluation data has no test split (0 held-out pairs): prepare it with --test-size > 0")
    if info.method == "reward":  # a reward model scores the pairs and generates nothing (evaluate/reward.py)
        from dpolab.evaluate.reward import evaluate_reward
        return evaluate_reward(info, records, prepared, tokenizer, _collator(tokenizer, records), opts, started)
    tuned = load_model(info.model).eval()
    collate = _collator(tokenizer, records)
    base_model: list = []

    def load_base():
        if not base_model:
            base_model.append(load_model(reference).eval())
        return base_model[0]

    pc, pr = policy_logps(tuned, records, collate, opts.batch_size)
    rc, rr = _reference_logps(reference, records, prepared, collate, opts.batch_size, load_base)
    settings = GenerationSettings(max_new_tokens=opts.max_new_tokens, seed=opts.seed)
    items = _prompt_set(opts, custom_prompts, records, info.template, tokenizer)
    generations = _generations(items, load_base, tuned, tokenizer, info.template, settings)
    result = {
        "model": info.model, "reference": reference, "template": info.template, "beta": beta, "method": info.method,
        "data": str(prepared.path) if prepared else opts.data, **_metrics(info.method, records, pc, pr, rc, rr, beta),
        "lengths": {"base": M.length_stats([g["base_tokens"] for g in generations]),
                    "tuned": M.length_stats([g["tuned_tokens"] for g in generations])},
        "generation": asdict(settings), "generations": generations,
    }
    if judge is not None:
        result["judge"] = _judge(opts.judge, judge, generations, opts.seed)
    out = Path(opts.out) if opts.out else (info.run.eval_dir if info.run else Path("eval"))
    from dpolab.evaluate.report import write_report

    result["seconds"] = round(time.perf_counter() - started, 1)
    write_report(result, out, info)
    return result
