"""Publish stage: export a run (or a sweep's best trial) as a self-contained model folder with a model card, push it.

Loading is safe by construction: weights load from safetensors only, and training_args.bin (a pickle) is copied
byte for byte, never unpickled.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from dpolab.runinfo import RUN_META

# Tokenizer files any tokenizer class may have written; whichever exist are copied as they are.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt", "tokenizer.model")
RECORD_FILES = ("training_args.bin", "training_args.json", RUN_META)
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


class PublishError(RuntimeError):
    """Export or push cannot proceed; the message is one line saying why and what to do."""


def is_exported(path: Path) -> bool:
    return (path / "README.md").is_file() and (path / "config.json").is_file()


def _source(source: str | Path):
    """(RunInfo, run name, sweep folder or None) for a run folder, a sweep folder (its best/) or a model folder."""
    from dpolab.models import ModelNotFound
    from dpolab.runinfo import load_run_info

    path = Path(source).expanduser()
    if not path.is_dir():
        raise PublishError(f"{source}: not a folder; export needs a run folder, a sweep folder or a model folder")
    if path.name == "model" and (path.parent / "config.yaml").is_file():
        path = path.parent  # a run's model/ exports with what its run recorded
    try:
        info = load_run_info(str(path))
    except ModelNotFound as exc:
        raise PublishError(str(exc)) from None
    sweep = None
    if (path / "best" / "config.yaml").is_file():
        sweep = path
    elif (path / "best.json").is_file() and (path.parent / "sweep.yaml").is_file():
        sweep = path.parent
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


def export_model(source: str | Path, out: Path, overwrite: bool = False, max_shard_size: int | str = "2GB",
                 repo_id: str | None = None) -> Path:
    """Write `out`: weights (safetensors, sharded above `max_shard_size`), config, tokenizer, training records and a
    model card. Written to a temporary folder and renamed, so `out` is either complete or untouched."""
    from dpolab.card import build_card, load_sweep

    info, name, sweep = _source(source)
    model_dir = Path(info.model)
    out = Path(out).expanduser()
    protected = [Path(source).expanduser().resolve(), model_dir.resolve()]
    if any(out.resolve() == p or out.resolve() in p.parents for p in protected):
        raise PublishError(f"--out {out} would replace the source {source}; choose another folder")
    if out.exists() and not overwrite:
        raise PublishError(f"{out} already exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    try:
        _write_weights(model_dir, tmp, max_shard_size)
        for file in TOKENIZER_FILES + RECORD_FILES:
            if (model_dir / file).is_file():
                shutil.copyfile(model_dir / file, tmp / file)  # bytes only: the pickle is never opened
        report_path = info.run_dir / "data_report.json" if info.run_dir else None
        report = json.loads(report_path.read_text()) if report_path and report_path.is_file() else None
        card = build_card(info, name, repo_id=repo_id, sweep=load_sweep(sweep) if sweep else None,
                          data_report=report, base_license=_base_license(info.base_model))
        card.save(tmp / "README.md")
        if out.exists():  # overwrite: move the old folder aside first so the swap is two renames
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            out.rename(trash / out.name)
            try:
                tmp.rename(out)
            except OSError:
                (trash / out.name).rename(out)  # put the old folder back
                raise
            shutil.rmtree(trash, ignore_errors=True)
        else:
            tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


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


def _run_name(folder: Path) -> str:
    from huggingface_hub import ModelCard

    try:
        return ModelCard.load(folder / "README.md").data.model_name or folder.resolve().name
    except Exception:  # a hand-written card without dpolab's metadata
        return folder.resolve().name


def _stage(folder: Path, repo_id: str, into: Path) -> Path:
    """`folder` as it will be uploaded: links to its files and a card whose usage snippet loads `repo_id`."""
    from dpolab.card import set_model_id

    for file in folder.rglob("*"):
        if file.is_file() and file.relative_to(folder).as_posix() != "README.md":
            (into / file.relative_to(folder)).parent.mkdir(parents=True, exist_ok=True)
            os.symlink(file.resolve(), into / file.relative_to(folder))
    (into / "README.md").write_text(set_model_id((folder / "README.md").read_text(), repo_id))
    return into


def push_model(source: str | Path, repo_id: str, private: bool = False, revision: str | None = None,
               dry_run: bool = False, token: str | None = None, endpoint: str | None = None) -> dict[str, Any]:
    """Upload an exported folder (exporting `source` to a temporary one first when it is a run or sweep) to the Hub
    model repo `repo_id`, creating the repo when needed. `dry_run`: only list what would be uploaded, no request."""
    if not REPO_ID.fullmatch(repo_id or ""):
        raise PublishError(f"--repo must be OWNER/NAME (letters, digits, '-', '_', '.'), got {repo_id!r}")
    path = Path(source).expanduser()
    with tempfile.TemporaryDirectory(prefix="dpolab-push-") as tmp:
        if is_exported(path):
            folder, name = _stage(path, repo_id, Path(tmp)), _run_name(path)
        else:
            folder = export_model(path, Path(tmp) / "export", repo_id=repo_id)
            name = _run_name(folder)
        files = [(p.relative_to(folder).as_posix(), p.stat().st_size) for p in sorted(folder.rglob("*")) if p.is_file()]
        result: dict[str, Any] = {"repo_id": repo_id, "files": files, "card": (folder / "README.md").read_text(),
                                  "commit_message": f"Upload {name} trained with dpolab", "dry_run": dry_run}
        if not dry_run:
            result["url"] = _upload(folder, repo_id, private, revision, token, endpoint, result["commit_message"])
    return result


def _upload(folder: Path, repo_id: str, private: bool, revision: str | None, token: str | None,
            endpoint: str | None, message: str) -> str:
    import httpx2
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    secret = token or get_token()  # huggingface_hub's own lookup: HF_TOKEN, then the saved login
    if not secret:
        raise PublishError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (a token with write access)")
    api = HfApi(endpoint=endpoint, token=secret)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(folder_path=folder, repo_id=repo_id, repo_type="model", revision=revision,
                                   commit_message=message)
    except HfHubHTTPError as exc:
        raise PublishError(_scrub(_http_message(exc, repo_id, api.endpoint), secret)) from None
    except (OfflineModeIsEnabled, httpx2.HTTPError, OSError) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise PublishError(_scrub(f"cannot reach {api.endpoint} ({type(exc).__name__}: {first}); are you offline?",
                                  secret)) from None
    except ValueError as exc:  # invalid card metadata, rejected revision
        raise PublishError(_scrub(" ".join(str(exc).split()), secret)) from None
    return str(getattr(commit, "commit_url", commit))


def _http_message(exc, repo_id: str, endpoint: str) -> str:
    status = exc.response.status_code if exc.response is not None else None
    if status == 401:
        return f"{endpoint} refused the token (401): it is missing, invalid or expired; set HF_TOKEN or run `hf auth login`"
    if status == 403:
        return f"no permission to write to {repo_id} (403): use a token with write access to that namespace"
    if status == 404:
        return f"{repo_id} or its revision was not found (404) at {endpoint}"
    return f"the Hub refused the upload to {repo_id} ({status}): {(str(exc).splitlines() or [''])[0][:300]}"


def _scrub(message: str, secret: str | None) -> str:
    """Belt and braces: no message that leaves this module may carry the token."""
    return message.replace(secret, "***") if secret else message
