"""`dpolab push`: upload an exported folder (or a run, exported first) to the Hugging Face Hub.

Every file of the folder goes up, GGUF files and the Ollama Modelfile of a `--format gguf` export included: the Hub
answers huggingface_hub's preupload check with LFS for large and binary files (*.gguf is LFS in every Hub repo's
default .gitattributes), so they take the LFS path without anything special here. The token (HF_TOKEN or the
huggingface_hub login) is never printed, logged or written.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

from dpolab.errors import PublishError
from dpolab.folders import owner
from dpolab.publish.export import export_model, is_exported

REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def _run_name(folder: Path) -> str:
    from huggingface_hub import ModelCard

    try:
        return ModelCard.load(folder / "README.md").data.model_name or folder.resolve().name
    except Exception:  # a hand-written card without dpolab's metadata
        return folder.resolve().name


def _stage(folder: Path, repo_id: str, into: Path) -> Path:
    """`folder` as it will be uploaded: links to its files and a card whose usage snippet loads `repo_id`."""
    from dpolab.publish.card import set_model_id

    for file in folder.rglob("*"):
        if file.is_file() and file.relative_to(folder).as_posix() not in ("README.md", owner.MARKER):
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
        files = [(p.relative_to(folder).as_posix(), p.stat().st_size) for p in sorted(folder.rglob("*"))
                 if p.is_file() and p.name != owner.MARKER]
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
                                   commit_message=message, ignore_patterns=[owner.MARKER])
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
