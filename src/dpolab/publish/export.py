"""`dpolab export`: a run (or a sweep's best trial) as a self-contained model folder with a model card.

Formats: `hf` (default) is a transformers folder; `gguf` adds MODEL-QUANT.gguf files (publish.gguf) and an Ollama
Modelfile (publish.modelfile) to it; `--adapter` writes a LoRA run's PEFT adapter folder instead of the merged model.

Loading is safe by construction: weights load from safetensors only, and training_args.bin (a pickle) is never
unpickled: copied, then its path strings rewritten at the opcode level (publish.portable), so that no absolute local
path of this machine is in any exported file.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from dpolab import EMBEDDED_MODEL
from dpolab.errors import PublishError
from dpolab.folders import owner
from dpolab.folders.run import MODEL_META, RunFolder
from dpolab.fsutil import remove_folder

# Tokenizer files any tokenizer class may have written; whichever exist are copied as they are.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt", "tokenizer.model")
RECORD_FILES = ("training_args.bin", "training_args.json", MODEL_META)
FORMATS = ("hf", "gguf")
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"  # PEFT's file names


def is_exported(path: Path) -> bool:
    """A folder `dpolab export` wrote: a card and a model (config.json) or a LoRA adapter (adapter_config.json)."""
    return (path / "README.md").is_file() and ((path / "config.json").is_file() or (path / ADAPTER_CONFIG).is_file())


def _source(source: str | Path):
    """(RunInfo, run name, sweep folder or None) for a run folder, a sweep folder (its best/) or a model folder."""
    from dpolab.folders.info import load_run_info
    from dpolab.folders.sweep import SweepFolder

    path = Path(source).expanduser()
    if not path.is_dir():
        raise PublishError(f"{source}: not a folder; export needs a run folder, a sweep folder or a model folder")
    if path.name == "model" and RunFolder.is_run(path.parent):
        path = path.parent  # a run's model/ exports with what its run recorded
    info = load_run_info(str(path))
    sweep = path if SweepFolder.is_sweep_with_best(path) else getattr(SweepFolder.of_best(path), "path", None)
    model_dir = Path(info.model)
    name = (sweep or info.run_dir or (model_dir.parent if model_dir.name == "model" else model_dir)).resolve().name
    return info, name, sweep


def _base_license(base_model: str | None) -> str | None:
    """The license a local base model's own card declares (e.g. an earlier dpolab export), if any."""
    card = Path(base_model).expanduser() / "README.md" if base_model else None
    if card is None or not card.is_file():
        return None
    from huggingface_hub import ModelCard

    try:
        return ModelCard.load(card).data.license
    except Exception:  # an unreadable card only costs the license line
        return None


def _check_options(fmt: str, quants: tuple[str, ...], adapter: bool) -> None:
    from dpolab.publish.gguf import QUANTS

    if fmt not in FORMATS:
        raise PublishError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if bad := [q for q in quants if q not in QUANTS]:
        raise PublishError(f"--quant must be one of {', '.join(QUANTS)}, got {bad[0]!r}")
    if adapter and fmt != "hf":
        raise PublishError("--adapter exports the PEFT adapter folder; it cannot be combined with --format gguf")


def _check_generative(info, source) -> None:
    if info.method == "reward":  # the card, GGUF and Modelfile are written for text generation
        raise PublishError(f"{source} is a reward model (method reward): export writes generative models; its "
                           f"model/ folder loads as it is with AutoModelForSequenceClassification")


def export_model(source: str | Path, out: Path, overwrite: bool = False, max_shard_size: int | str = "2GB",
                 repo_id: str | None = None, fmt: str = "hf", quants: tuple[str, ...] | list[str] = ("f16",),
                 adapter: bool = False) -> Path:
    """Write `out`: weights (safetensors, sharded above `max_shard_size`), config, tokenizer, training records and a
    model card. `fmt="gguf"` adds one MODEL-QUANT.gguf per quant and an Ollama Modelfile (the folder still loads with
    transformers); `adapter=True` writes the LoRA adapter instead of the merged model. Every record is made portable
    (publish.portable). Written to a temporary folder and renamed, so `out` is either complete or untouched."""
    quants = tuple(dict.fromkeys(quants or ("f16",)))
    _check_options(fmt, quants, adapter)
    info, name, sweep = _source(source)
    _check_generative(info, source)
    model_dir = Path(info.model)
    out = Path(out).expanduser()
    protected = [Path(source).expanduser().resolve(), model_dir.resolve()]
    if any(out.resolve() == p or out.resolve() in p.parents for p in protected):
        raise PublishError(f"--out {out} would replace the source {source}; choose another folder")
    if overwrite:
        owner.check_replaceable(out, "export", "--out", inputs=[source])
    elif out.exists():
        raise PublishError(f"{out} already exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    try:
        if adapter:
            _write_adapter(info, name, tmp, repo_id)
        else:
            _write_model(info, name, sweep, tmp, max_shard_size, repo_id, quants if fmt == "gguf" else ())
        owner.mark(tmp, "export")
        remove_folder(out)  # checked above: dpolab's own export
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _copy_records(model_dir: Path, target: Path, run_dir: Path | None) -> None:
    from dpolab.publish.portable import make_folder_portable

    for file in TOKENIZER_FILES + RECORD_FILES:
        if (model_dir / file).is_file():
            shutil.copyfile(model_dir / file, target / file)  # bytes only: the pickle is never opened
    make_folder_portable(target, run_dir)  # no local path of this machine leaves it (records, configs, pickle)


def _write_model(info, name: str, sweep, tmp: Path, max_shard_size, repo_id: str | None, quants: tuple[str, ...]):
    model_dir = Path(info.model)
    _write_weights(model_dir, tmp, max_shard_size)
    _copy_records(model_dir, tmp, info.run_dir)
    local = _write_gguf_files(model_dir, tmp, name, info.template, quants) if quants else None
    _card(info, name, sweep, repo_id, local).save(tmp / "README.md")


def _card(info, name: str, sweep, repo_id: str | None, local: list[dict] | None):
    from dpolab.publish.card import build_card, load_sweep

    return build_card(info, name, repo_id=repo_id, sweep=load_sweep(sweep) if sweep else None,
                      data_report=info.data_report, base_license=_base_license(info.base_model), local=local)


def model_card(source: str | Path, repo_id: str | None = None) -> str:
    """The model card (README.md text) `export_model(source)` writes for the merged model in the hf format, without
    exporting anything: the studio shows it before an export."""
    info, name, sweep = _source(source)
    _check_generative(info, source)
    return str(_card(info, name, sweep, repo_id, None))


def _write_gguf_files(model_dir: Path, tmp: Path, name: str, template: str, quants: tuple[str, ...]) -> list[dict]:
    """One GGUF per quant and a Modelfile for the first; returns (file, quant, size) rows for the card."""
    from dpolab.publish.gguf import gguf_name, write_gguf
    from dpolab.publish.modelfile import modelfile_text

    files, first = [], None
    for quant in quants:
        written = write_gguf(model_dir, tmp / gguf_name(name, quant), quant, template, name)
        first = first or written
        files.append({"file": written["file"], "quant": quant, "size": (tmp / written["file"]).stat().st_size})
    tok = first["tokenizer"]

    def render(messages):
        from dpolab.publish.modelfile import jinja_template

        chat = jinja_template(template, tok.chat_template if isinstance(tok.chat_template, str) else None)
        return tok.apply_chat_template(messages, chat_template=chat, add_generation_prompt=True, tokenize=False)

    (tmp / "Modelfile").write_text(modelfile_text(first["file"], template, first["stops"], first["context"],
                                                  render=render if template == "chat" else None))
    return files


def _write_adapter(info, name: str, tmp: Path, repo_id: str | None) -> None:
    """The PEFT adapter folder of a LoRA run (adapter_config.json + adapter_model.safetensors), tokenizer, records,
    and its own card. adapter_config.json names the base by Hub id when it has one, so PEFT finds it anywhere."""
    import json

    from dpolab.publish.card import EMBEDDED_HUB_ID, build_adapter_card, hub_id

    run = info.run
    adapter_dir = run.adapter_dir if run is not None else None
    if adapter_dir is None or not (adapter_dir / ADAPTER_CONFIG).is_file() or not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        where = adapter_dir or info.model
        raise PublishError(f"--adapter: no LoRA adapter at {where} ({ADAPTER_CONFIG} + {ADAPTER_WEIGHTS}); a run "
                           "trained without lora has none: export the model without --adapter")
    shutil.copyfile(adapter_dir / ADAPTER_WEIGHTS, tmp / ADAPTER_WEIGHTS)
    shutil.copyfile(adapter_dir / ADAPTER_CONFIG, tmp / ADAPTER_CONFIG)
    base_id = EMBEDDED_HUB_ID if info.base_model == EMBEDDED_MODEL else hub_id(info.base_model)
    if base_id:
        config = json.loads((tmp / ADAPTER_CONFIG).read_text())
        config["base_model_name_or_path"] = base_id
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    _copy_records(Path(info.model), tmp, info.run_dir)
    base_ref = base_id or f"PATH/TO/{Path(info.base_model or 'base-model').name}"
    build_adapter_card(info, name, base_ref, repo_id=repo_id).save(tmp / "README.md")


def _write_weights(model_dir: Path, target: Path, max_shard_size: int | str) -> None:
    from transformers import AutoModelForCausalLM

    try:
        # dtype="auto" keeps the dtype the run saved; use_safetensors=True refuses pickled .bin weights.
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto", use_safetensors=True)
    except (OSError, ValueError) as exc:
        raise PublishError(f"cannot load safetensors weights from {model_dir}: {str(exc).splitlines()[0][:300]}") from None
    try:
        model.save_pretrained(target, max_shard_size=max_shard_size)
    except ValueError as exc:  # e.g. a --max-shard-size that is no size
        raise PublishError(f"cannot save the weights: {str(exc).splitlines()[0][:300]}") from None
