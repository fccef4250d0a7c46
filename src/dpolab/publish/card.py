"""The model card (README.md) of an exported model: Hub metadata + what was trained, how, how well, how to prompt it."""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dpolab import EMBEDDED_MODEL
from dpolab.folders.info import RunInfo
from dpolab.folders.sweep import SweepFolder

# The embedded model is a converted copy of this Hub model; the Hub needs its id (and the license it carries).
EMBEDDED_HUB_ID, EMBEDDED_LICENSE = "HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0"
PLACEHOLDER_OWNER = "your-username"
METHOD_NAMES = {"dpo": "Direct Preference Optimization (DPO)", "simpo": "SimPO (reference-free preference optimization)",
                "cpo": "Contrastive Preference Optimization (CPO)", "orpo": "ORPO (odds-ratio preference optimization)",
                "kto": "Kahneman-Tversky Optimization (KTO)"}
MAX_TRIAL_ROWS = 100

PROMPT_FORMATS = {
    "qa": "Each prompt is `Q: {prompt}\\nA:` (earlier turns of a conversation come first as `Q: …\\n` and `A: …\\n` "
          "lines); the response follows after a single space and ends with the EOS token.",
    "raw": "The prompt is the text exactly as in the source data (Anthropic HH style: `\\n\\nHuman: {prompt}"
           "\\n\\nAssistant:`); the response follows directly (HH responses start with a space) and ends with the EOS token.",
    "chat": "The tokenizer's chat template: the prompt is `tokenizer.apply_chat_template(messages, "
            "add_generation_prompt=True)`; the response ends with the template's end-of-turn token.",
}

# How the prompt string is built in the usage snippet: the exact format used in training (dpolab.data.templates).
_PROMPT_CODE = {
    "qa": 'prompt = f"Q: {question}\\nA:"\ninputs = tokenizer(prompt, return_tensors="pt")',
    "raw": 'prompt = f"\\n\\nHuman: {question}\\n\\nAssistant:"\ninputs = tokenizer(prompt, return_tensors="pt")',
    "chat": 'messages = [{"role": "user", "content": question}]\n'
            'prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)\n'
            '# the chat template already holds the special tokens\n'
            'inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)',
}

SNIPPET = '''import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

model_id = "{model_id}"
tokenizer = AutoTokenizer.from_pretrained(model_id)
model = AutoModelForCausalLM.from_pretrained(model_id)

question = "How can I make my mornings less stressful?"
{prompt_code}
torch.manual_seed(0)
output = model.generate(**inputs, max_new_tokens=64, do_sample=False,
                        pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))'''

LIMITATIONS = """## Intended use and limitations

This is a small model aligned with DPO for research, teaching and experiments with preference optimization. It is
**not** meant for production use, nor for medical, legal, financial or safety advice.

- Small language models hallucinate: answers can be fluent and wrong. Check anything that matters.
- Preference data such as Anthropic's HH-RLHF contains offensive and upsetting content by design (red-teaming
  conversations, harmful rejected answers); a model trained on it can still produce such text.
- DPO moves the model towards the preferred responses of its training pairs; it does not add knowledge, and the
  reward metrics above are measured on a small held-out split of the same data.
"""


@dataclass(frozen=True)
class Sweep:
    path: Path
    search_space: Any
    best: dict | None
    trials: list[dict[str, str]]


def load_sweep(path: Path) -> Sweep:
    folder = SweepFolder(path)
    config = folder.read_config_tree() if folder.config_file.is_file() else {}
    trials = []
    if folder.trials_csv.is_file():
        with open(folder.trials_csv, newline="") as handle:
            trials = list(csv.DictReader(handle))
    return Sweep(path, config.get("search_space"), folder.read_best(), trials)


def hub_id(name: str | None) -> str | None:
    """`name` when it reads as a Hub id (owner/name, not a local path or file), else None."""
    if not name:
        return None
    if name == EMBEDDED_MODEL:
        return EMBEDDED_HUB_ID
    if Path(name).expanduser().exists() or not re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        return None
    return None if re.search(r"\.(jsonl?|parquet|csv|gz)$", name) else name


def _display(name: str | None, dataset: bool = False) -> str:
    """How a model/dataset is named in the card: Hub ids as links, local paths by their last part only."""
    if not name:
        return "unknown"
    if name == "demo" and dataset:
        return "the dpolab demo preference set (shipped with dpolab)"
    if hub := hub_id(name):
        return f"[{hub}](https://huggingface.co/{'datasets/' if dataset else ''}{hub})"
    return f"`{Path(name).name}` (a local {'file' if Path(name).suffix else 'folder'})"


def eval_metrics(info: RunInfo) -> dict[str, tuple[str, float]]:
    """metric id -> (where it comes from, value): eval.json for accuracy and margin when present, else metrics.json."""
    best = (info.metrics or {}).get("best") or {}
    policy = ((info.eval or {}).get("metrics") or {}).get("policy") or {}
    found = {}
    for key, eval_key, best_key in (("eval_loss", None, "loss"), ("reward_accuracy", "accuracy", "rewards/accuracies"),
                                    ("reward_margin", "margin_mean", "rewards/margins")):
        if eval_key and policy.get(eval_key) is not None:
            found[key] = ("eval/eval.json", policy[eval_key])
        elif best.get(best_key) is not None:
            found[key] = (f"metrics.json (best epoch {best.get('epoch')})", best[best_key])
    return found


METRIC_NAMES = {"eval_loss": "Eval loss (DPO)", "reward_accuracy": "Reward accuracy", "reward_margin": "Reward margin"}


def _table(rows: list[tuple[str, Any]]) -> str:
    return "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows if v not in (None, "", "None"))


def _cell(value: Any) -> str:
    """A markdown table cell; CSV floats shortened to 4 significant digits (trials.csv keeps them whole)."""
    text = str(value)
    if re.fullmatch(r"-?\d*\.\d+(e-?\d+)?|-?\d+e-?\d+", text):
        text = f"{float(text):.4g}"
    return text.replace("|", "\\|").replace("\n", " ")


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _training_section(info: RunInfo) -> str:
    cfg, metrics = info.config or {}, info.metrics or {}
    lora = cfg.get("lora")
    steps = cfg.get("max_steps")
    rows = [
        ("Base model", _display(info.base_model)), ("Reference model", _display((cfg.get("ref_model") or info.base_model))),
        ("Method", f"`{info.method}`"),
        ("Loss", f"`{info.loss_type}`" if info.loss_type and info.method == "dpo" else None), ("beta", info.beta),
        ("Learning rate", cfg.get("learning_rate")), ("LR schedule", cfg.get("lr_scheduler")),
        ("Batch size", f"{cfg['batch_size']} pairs x {cfg.get('grad_accum', 1)} accumulation" if cfg.get("batch_size") else None),
        ("Epochs", cfg.get("epochs") if not steps or steps < 0 else f"{steps} steps"),
        ("Max length", (cfg.get("data") or {}).get("max_length")), ("Seed", cfg.get("seed")),
        ("LoRA", f"r={lora.get('r')}, alpha={lora.get('alpha')} (merged into the weights)" if lora else None),
        ("Optimizer steps", metrics.get("global_step")),
        ("Training time", f"{metrics['train_runtime_s']} s (whole run {metrics.get('total_time_s')} s)" if metrics.get("train_runtime_s") else None),
        ("Hardware", metrics.get("hardware")), ("PyTorch", metrics.get("torch")),
    ]
    return f"## Training\n\n{METHOD_NAMES.get(info.method, info.method)} with dpolab.\n\n" + _table(rows)


def _results_section(found: dict[str, tuple[str, float]]) -> str:
    if not found:
        return "## Results\n\nNo evaluation was recorded for this run."
    rows = "\n".join(f"| {METRIC_NAMES[k]} | {_fmt(v)} | {src} |" for k, (src, v) in found.items())
    return ("## Results\n\nOn the held-out test split of the preference data (reward accuracy: share of pairs whose "
            "chosen response gets the higher implicit DPO reward).\n\n| Metric | Value | From |\n|---|---|---|\n" + rows)


def _sweep_section(sweep: Sweep) -> str:
    parts = ["## Hyperparameter search", f"This model is the best trial of a sweep (`{sweep.path.name}`)."]
    if sweep.best:
        parts.append(f"Best trial: #{sweep.best.get('trial')}, {sweep.best.get('objective') or 'objective'} "
                     f"{_fmt(sweep.best.get('value'))}, "
                     f"parameters `{sweep.best.get('params')}`.")
    if sweep.search_space is not None:
        parts.append("Search space:\n\n```yaml\n" + yaml.safe_dump(sweep.search_space, sort_keys=False).strip() + "\n```")
    if sweep.trials:
        columns = list(sweep.trials[0])
        lines = ["| " + " | ".join(map(_cell, columns)) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(_cell(row.get(c, "")) for c in columns) + " |" for row in sweep.trials[:MAX_TRIAL_ROWS]]
        more = len(sweep.trials) - MAX_TRIAL_ROWS
        parts.append("Trials:\n\n" + "\n".join(lines) + (f"\n\n({more} more trials in trials.csv)" if more > 0 else ""))
    return "\n\n".join(parts)


def build_card(info: RunInfo, name: str, repo_id: str | None = None, sweep: Sweep | None = None,
               data_report: dict | None = None, base_license: str | None = None, local: list[dict] | None = None):
    """The ModelCard (huggingface_hub) of a run; `repo_id` is the id the usage snippet loads; `local`: the GGUF files
    of the export (file, quant, size), which add the "Run it locally" section."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    source = (data_report or {}).get("source") or info.dataset
    dataset_id = hub_id(source) if source not in (None, "demo") else None
    base = hub_id(info.base_model)
    found = eval_metrics(info)
    results = [EvalResult(task_type="text-generation", dataset_type=dataset_id or "preference-pairs",
                          dataset_name=Path(source).name if source and not dataset_id else (source or "preference pairs"),
                          dataset_split="test", metric_type=key, metric_name=METRIC_NAMES[key], metric_value=value)
               for key, (_, value) in found.items()]
    data = ModelCardData(
        base_model=base, datasets=[dataset_id] if dataset_id else None, library_name="transformers",
        license=EMBEDDED_LICENSE if info.base_model == EMBEDDED_MODEL else base_license,
        pipeline_tag="text-generation", tags=sorted({"dpolab", "text-generation", info.method}), model_name=name,
        eval_results=results or None,
    )
    report = data_report or {}
    model_id = repo_id or f"{PLACEHOLDER_OWNER}/{name}"
    body = [
        f"# {name}",
        f"{_display(info.base_model)} aligned with {METHOD_NAMES.get(info.method, info.method)} on {_display(source, dataset=True)}, "
        "trained with dpolab.",
        "## Data\n\n" + _table([("Dataset", _display(source, dataset=True)), ("Training pairs", report.get("train")),
                                ("Test pairs", report.get("test")), ("Template", f"`{info.template}`")]),
        _training_section(info),
        _results_section(found),
        f"## Prompt format (`{info.template}`)\n\n{PROMPT_FORMATS.get(info.template, info.template)} Prompt the model "
        "exactly this way: it was trained on this format only.",
        "## Usage\n\nWith plain `transformers` (set `model_id` to the path of a local copy to load it from disk):\n\n"
        "```python\n" + SNIPPET.format(model_id=model_id, prompt_code=_PROMPT_CODE.get(info.template, _PROMPT_CODE["qa"]))
        + "\n```",
    ]
    if local:
        data.tags.append("gguf")
        body.append(run_locally_section(name, info.template, local))
    if sweep is not None:
        body.append(_sweep_section(sweep))
    body.append(LIMITATIONS)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(body))


def set_model_id(card_text: str, repo_id: str) -> str:
    """The card with its usage snippet loading `repo_id` (an export made before the repo id was known)."""
    return re.sub(r'^model_id = ".*"$', f'model_id = "{repo_id}"', card_text, count=1, flags=re.M)


def _megabytes(size: int) -> str:
    return f"{size / 1e6:.0f} MB"


def run_locally_section(name: str, template: str, files: list[dict]) -> str:
    """llama.cpp, Ollama and LM Studio commands for the export's GGUF files (the first one is the Modelfile's)."""
    from dpolab.generation import GenerationSettings

    s = GenerationSettings()
    first = files[0]["file"]
    rows = "\n".join(f"| `{f['file']}` | {f['quant']} | {_megabytes(f['size'])} |" for f in files)
    sampling = f"--temp {s.temperature} --top-p {s.top_p} --top-k {s.top_k} --repeat-penalty {s.repetition_penalty}"
    tag = re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-.") or "model"
    return (
        "## Run it locally\n\n"
        "GGUF files for [llama.cpp](https://github.com/ggml-org/llama.cpp), [Ollama](https://ollama.com) and "
        "LM Studio, written by dpolab:\n\n| File | Weights | Size |\n|---|---|---|\n" + rows + "\n\n"
        f"Each file carries the prompt format the model was trained with (`{template}`) as its chat template, so chat "
        "front-ends build the prompt exactly as training did, and the sampling defaults of the dpolab app "
        f"({sampling}).\n\n"
        "llama.cpp (`--jinja` applies the chat template stored in the file):\n\n```bash\n"
        f"llama-cli -m {first} --jinja -cnv -n {s.max_new_tokens}\n"
        f"llama-server -m {first} --jinja --port 8080   # OpenAI-compatible API: http://localhost:8080/v1/chat/completions\n"
        "```\n\n"
        "Ollama: the `Modelfile` beside the file sets the template, the stop tokens and the same sampling defaults "
        "(edit its `FROM` line to use another file):\n\n```bash\n"
        f"ollama create {tag} -f Modelfile\nollama run {tag}\n```\n\n"
        "LM Studio: load the `.gguf` file; it reads the chat template from the file."
    )


ADAPTER_SNIPPET = '''import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

model_id = "{model_id}"  # this adapter
base_id = "{base_id}"  # the model it was trained on
tokenizer = AutoTokenizer.from_pretrained(model_id)
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_id), model_id)
model = model.merge_and_unload()  # optional: one plain model, as `dpolab export` writes by default

question = "How can I make my mornings less stressful?"
{prompt_code}
output = model.generate(**inputs, max_new_tokens=64, do_sample=False,
                        pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))'''


def build_adapter_card(info: RunInfo, name: str, base_id: str, repo_id: str | None = None):
    """The ModelCard of a LoRA adapter export: PEFT metadata, the base model to load it on, a PEFT usage snippet."""
    from huggingface_hub import ModelCard, ModelCardData

    lora = (info.config or {}).get("lora") or {}
    base = hub_id(info.base_model)
    data = ModelCardData(base_model=base, library_name="peft", pipeline_tag="text-generation", model_name=name,
                         license=EMBEDDED_LICENSE if info.base_model == EMBEDDED_MODEL else None,
                         tags=["dpo", "dpolab", "lora", "peft", "text-generation"])
    embedded_note = ("\n\nIt was trained on dpolab's embedded copy of that model (dequantized from its Q4_1 GGUF "
                     "release); on the original Hub weights it gives close, not identical, outputs."
                     if info.base_model == EMBEDDED_MODEL else "")
    body = [
        f"# {name} (LoRA adapter)",
        f"A LoRA adapter (r={lora.get('r')}, alpha={lora.get('alpha')}) for {_display(info.base_model)}, trained with "
        "DPO by dpolab. Load it on its base model with PEFT; `dpolab export` without `--adapter` writes the merged "
        "model instead." + embedded_note,
        _training_section(info).replace(" (merged into the weights)", ""),
        _results_section(eval_metrics(info)),
        f"## Prompt format (`{info.template}`)\n\n{PROMPT_FORMATS.get(info.template, info.template)}",
        "## Usage\n\n```python\n" + ADAPTER_SNIPPET.format(
            model_id=repo_id or f"{PLACEHOLDER_OWNER}/{name}", base_id=base_id,
            prompt_code=_PROMPT_CODE.get(info.template, _PROMPT_CODE["qa"])) + "\n```",
        LIMITATIONS,
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(body))
