"""Publish: export a run (or a sweep's best trial) with its model card, then push it to the Hub, dry run first.

UI only. The card shown before an export is `dpolab.publish.model_card` (what export writes); after it, the exported
README.md. Export and push run as background jobs (`dpolab export`, `dpolab push`, `dpolab.jobs`) writing under the
runs root (RUNS/exports/<name>). The real push is offered only after a finished dry run of the same folder, repo and
visibility (`dpolab push --dry-run`, which sends nothing and needs no token) that is newer than the export.

The token: a password field; it reaches the push job through its environment (HF_TOKEN, which `dpolab push` reads
through huggingface_hub), never its argv (argv is job.json and the command shown). It is read in the button's callback
and the field is cleared there, so the token leaves the page (and the browser's DOM) as soon as it has been used;
nothing here prints, logs or writes it, and any error shown is scrubbed of it.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pandas as pd
import streamlit as st

from dpolab.app.common import fmt_time, runs_root
from dpolab.app.jobview import last_line, show_job
from dpolab.errors import DpolabError
from dpolab.folders.catalog import folders_under
from dpolab.folders.info import load_run_info
from dpolab.folders.run import RunFolder
from dpolab.folders.sweep import SweepFolder
from dpolab.jobs import Job, JobError, list_jobs, start_job
from dpolab.publish import is_exported, model_card
from dpolab.publish.gguf import QUANTS
from dpolab.publish.push import REPO_ID

EXPORTS = "exports"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
MESSAGE = "publish_message"  # (kind, text) left by a button's callback for the next run to show


# ------------------------------------------------------------------------------------------------------------ models
def find_models(root: Path) -> dict[str, str]:
    """{resolved path: label} of the runs with a model/ and the sweeps with a best/ directly under `root`, newest
    first (unfinished runs and other folders are left out)."""
    def label(path: Path) -> str | None:
        if SweepFolder.is_sweep_with_best(path):
            return f"{path.name} (sweep, best trial)"
        if RunFolder.is_run(path) and (RunFolder(path).model_dir / "config.json").is_file():
            return f"{path.name} (run)"
        return None

    labels = {str(path.resolve()): label(path) for path in folders_under(root, lambda c: True)}
    return {path: text for path, text in labels.items() if text is not None}


def find_exports(root: Path) -> list[Path]:
    folder = root / EXPORTS
    if not folder.is_dir():
        return []
    return sorted((p.resolve() for p in folder.iterdir() if p.is_dir() and is_exported(p)),
                  key=lambda p: p.stat().st_mtime, reverse=True)


def newest(root: Path, kind: str, target: Path, argv: list[str] | None = None) -> Job | None:
    """The newest job of `kind` on `target` (with exactly `argv`, when given)."""
    target = target.resolve()
    return next((job for job in list_jobs(root) if job.kind == kind and job.target == target
                 and (argv is None or job.argv == argv)), None)


def one_line(exc: BaseException, secret: str | None = None) -> str:
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:400]
    return text.replace(secret, "***") if secret else text


def show_card(text: str, key: str) -> None:
    """A model card as the Hub renders it: the markdown body, and the YAML metadata apart."""
    from huggingface_hub import ModelCard

    card = ModelCard(text, ignore_metadata_errors=True)
    with st.container(border=True, key=key):
        st.markdown(card.text)
    with st.expander("Card metadata (YAML)"):
        st.code(card.data.to_yaml(), language="yaml")


# ------------------------------------------------------------------------------------------------------------ export
def export_argv(model: str, out: Path, fmt: str, quants: list[str], adapter: bool, overwrite: bool) -> list[str]:
    argv = ["export", model, "--out", str(out)]
    if fmt != "hf":
        argv += ["--format", fmt]
        for quant in quants:
            argv += ["--quant", quant]
    if adapter:
        argv.append("--adapter")
    if overwrite:
        argv.append("--overwrite")
    return argv


def export_section(root: Path, model: str) -> Path | None:
    """The export form and job; returns the export folder."""
    st.header("Export")
    if st.session_state.get("_export_name_of") != model:  # another model picked: its own default name
        st.session_state["_export_name_of"] = model
        st.session_state["export_name"] = f"{Path(model).name}-export"
    a, b = st.columns([3, 1])
    name = a.text_input("Export name", key="export_name", help=f"Written to {root / EXPORTS}/<name>.").strip()
    overwrite = b.checkbox("Replace if it exists", key="export_overwrite", help="Replace an earlier export of that name.")
    a, b, c = st.columns(3)
    fmt = a.radio("Format", ["hf", "gguf"], key="export_format", horizontal=True,
                  help="hf: a transformers folder. gguf: the same folder plus MODEL-QUANT.gguf (llama.cpp, Ollama, "
                       "LM Studio) and an Ollama Modelfile.")
    quants = b.multiselect("GGUF weights", QUANTS, default=["f16"], key="export_quants", disabled=fmt != "gguf",
                           help="One .gguf file per choice.")
    run = load_run_info(model).run
    has_adapter = run is not None and run.adapter_dir.is_dir()
    adapter = c.toggle("LoRA adapter only", key="export_adapter", disabled=not has_adapter or fmt != "hf",
                       help="Export the PEFT adapter instead of the merged model (LoRA runs).") and has_adapter
    if not NAME.fullmatch(name):
        st.error("Export name: use letters, digits, '.', '_' or '-' (one folder name, no '/').")
        return None
    out = (root / EXPORTS / name).resolve()
    argv = export_argv(model, out, fmt, quants, adapter, overwrite)
    st.caption(f"Output folder: `{out}`")
    st.code(shlex.join(["dpolab", *argv]), language="bash")
    job = newest(root, "export", out)
    busy = any(j.active and j.target == out for j in list_jobs(root))
    problem = None
    if out.exists() and not overwrite:
        problem = f"{out} already exists: tick 'Replace if it exists' or choose another name"
    if fmt == "gguf" and not quants:
        problem = "GGUF weights: pick at least one"
    if problem and not busy:
        st.caption(problem)
    if st.button("Export", key="export_start", type="primary", disabled=bool(problem) or busy,
                 help="Runs `dpolab export` in the background."):
        try:
            start_job(root, "export", out, argv)
            st.rerun()
        except JobError as exc:
            st.error(one_line(exc))
    active = job is not None and job.active
    st.fragment(export_panel, run_every=1.0 if active else None)(root, out, active)
    if not is_exported(out) and (job is None or job.status != "running"):
        with st.expander("Model card preview (what export writes)", expanded=False):
            try:
                show_card(model_card(model), "export_card_preview")
            except (DpolabError, OSError, ValueError) as exc:
                st.error(one_line(exc))
    return out


def export_panel(root: Path, out: Path, was_active: bool) -> None:
    job = newest(root, "export", out)
    if job is not None:
        show_job(job, "export_job")
        if was_active and not job.active:
            st.rerun()
    if (job is None or not job.active) and is_exported(out):
        files = sorted(p for p in out.rglob("*") if p.is_file() and not p.name.startswith("."))
        st.success(f"Exported to `{out}`: {len(files)} files, {sum(p.stat().st_size for p in files) / 1e6:.1f} MB.")
        with st.expander("Files"):
            st.dataframe(pd.DataFrame({"file": [p.relative_to(out).as_posix() for p in files],
                                       "bytes": [p.stat().st_size for p in files]}), hide_index=True)
        st.subheader("Model card")
        show_card((out / "README.md").read_text(), "export_card")


# -------------------------------------------------------------------------------------------------------------- push
def push_argv(folder: Path, repo: str, private: bool, dry_run: bool) -> list[str]:
    return ["push", str(folder), "--repo", repo] + (["--private"] if private else []) + (["--dry-run"] if dry_run else [])


def dry_run_done(root: Path, folder: Path, repo: str, private: bool) -> Job | None:
    """The finished dry run of exactly this push, if it is newer than the export (else it previewed other files)."""
    job = newest(root, "push", folder, push_argv(folder, repo, private, True))
    if job is None or job.status != "finished":
        return None
    return job if (job.ended or 0) >= (folder / "README.md").stat().st_mtime else None


def _start_push(root: Path, dry_run: bool) -> None:
    """Button callback: start the push job, the token in its environment only; then forget the token."""
    token = st.session_state.get("push_token") or ""
    st.session_state["push_token"] = ""  # cleared before anything can fail: the token is not kept past this click
    folder = Path(st.session_state.get("push_source") or "")
    repo = (st.session_state.get("push_repo") or "").strip()
    private = bool(st.session_state.get("push_private"))
    if not REPO_ID.fullmatch(repo):
        st.session_state[MESSAGE] = ("error", f"Repo id: must be OWNER/NAME (letters, digits, '-', '_', '.'), got {repo!r}")
        return
    if not dry_run and dry_run_done(root, folder, repo, private) is None:
        st.session_state[MESSAGE] = ("error", "Push: run Preview (dry run) of this folder, repo and visibility first")
        return
    env = {"HF_TOKEN": token} if token and not dry_run else None  # a dry run sends nothing: it gets no token
    try:
        start_job(root, "push", folder, push_argv(folder, repo, private, dry_run), env=env)
    except (JobError, OSError) as exc:
        st.session_state[MESSAGE] = ("error", one_line(exc, token))
        return
    st.session_state[MESSAGE] = ("info", f"{'Dry run' if dry_run else 'Push'} of `{folder.name}` to `{repo}` started.")


def parse_dry_run(log: str) -> tuple[list[str], str | None]:
    """(the file lines, the card text) `dpolab push --dry-run` printed."""
    lines = log.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("dry run: would upload")), None)
    if start is None:
        return [], None
    files = []
    i = start + 1
    while i < len(lines) and lines[i].startswith("  "):
        files.append(lines[i].strip())
        i += 1
    return files, "\n".join(lines[i:]).strip("\n") or None


def push_section(root: Path, default: Path | None) -> None:
    st.header("Push to the Hugging Face Hub")
    exports = find_exports(root)
    if not exports:
        st.info(f"Nothing exported yet: export a model above (exports go to `{root / EXPORTS}`).")
        return
    options = [str(p) for p in exports]
    if default is not None and str(default) in options and st.session_state.get("push_source") not in options:
        st.session_state["push_source"] = str(default)
    source = st.selectbox("Exported folder", options, key="push_source",
                          format_func=lambda p: f"{Path(p).name} ({fmt_time(Path(p).stat().st_mtime)})",
                          help="What is uploaded: every file of this folder.")
    folder = Path(source)
    a, b = st.columns([3, 1])
    repo = a.text_input("Repo id", key="push_repo", placeholder="OWNER/NAME",
                        help="The Hub model repo; created if it does not exist.").strip()
    private = b.toggle("Private", key="push_private", help="Create the repo private (no effect on an existing repo).")
    st.text_input("Hugging Face token", type="password", key="push_token", autocomplete="off",
                  help="Needed for Push only (write access). Handed to the push job in its environment (HF_TOKEN), "
                       "never on its command line, never written or shown; the field is cleared once used. Leave it "
                       "empty to use the token of `hf auth login`.")
    valid = bool(REPO_ID.fullmatch(repo))
    if repo and not valid:
        st.error(f"Repo id: must be OWNER/NAME (letters, digits, '-', '_', '.'), got {repo!r}")
    if valid:
        st.code(shlex.join(["dpolab", *push_argv(folder, repo, private, False)]), language="bash")
    busy = any(j.active and j.target == folder for j in list_jobs(root))
    previewed = dry_run_done(root, folder, repo, private) if valid else None
    a, b = st.columns(2)
    a.button("Preview (dry run)", key="push_dry_run", on_click=_start_push, args=(root, True), disabled=not valid or busy,
             help="Lists the files and the card that would be uploaded; sends nothing.")
    b.button("Push", key="push_start", type="primary", on_click=_start_push, args=(root, False),
             disabled=previewed is None or busy,
             help="Uploads the folder (after a dry run of this folder, repo and visibility).")
    kind, text = st.session_state.pop(MESSAGE, (None, None))
    if kind == "error":
        st.error(text)
    elif kind == "info":
        st.info(text)
    job = newest(root, "push", folder)
    active = job is not None and job.active
    st.fragment(push_panel, run_every=1.0 if active else None)(root, folder, active)


def push_panel(root: Path, folder: Path, was_active: bool) -> None:
    job = newest(root, "push", folder)
    if job is None:
        return
    show_job(job, "push_job")
    if was_active and not job.active:
        st.rerun()
    if job.status != "finished":
        return
    if "--dry-run" in job.argv:
        files, card = parse_dry_run(job.log_file.read_text(errors="replace"))
        st.success(f"Dry run: {len(files)} files would be uploaded to `{job.argv[job.argv.index('--repo') + 1]}`.")
        st.code("\n".join(files), language="text")
        if card:
            st.subheader("Card as it would be uploaded")
            show_card(card, "push_card")
    else:
        st.success(last_line(job))


# -------------------------------------------------------------------------------------------------------------- page
def main() -> None:
    root = runs_root()
    st.title("Publish")
    st.caption(f"Runs root: `{root}`")
    models = find_models(root)
    out = None
    if not models:
        st.info(f"No trained model under `{root}` yet: train one on the Train page (or run a sweep), then export it here.")
        st.page_link("views/train.py", label="Go to Train", icon=":material/model_training:")
    else:
        wanted = st.query_params.get("model")
        if wanted and str(Path(wanted).expanduser().resolve()) in models and "publish_model" not in st.session_state:
            st.session_state["publish_model"] = str(Path(wanted).expanduser().resolve())
        model = st.selectbox("Model", list(models), format_func=models.get, key="publish_model",
                             help=f"Runs with a model/ and sweeps with a best/ under {root}.")
        _model_summary(model)
        out = export_section(root, model)
    push_section(root, out)


def _model_summary(model: str) -> None:
    try:
        info = load_run_info(model)
    except (DpolabError, OSError, ValueError) as exc:
        st.error(one_line(exc))
        return
    parts: list[Any] = [f"method `{info.method}`", f"base `{info.base_model}`", f"data `{info.dataset}`",
                        f"template `{info.template}`"]
    best = (info.metrics or {}).get("best") or {}  # the best eval point, its keys without "eval_"
    if best.get("loss") is not None:
        parts.append(f"best eval loss {best['loss']:.4f}")
    if best.get("rewards/accuracies") is not None:
        parts.append(f"reward accuracy {best['rewards/accuracies']:.2f}")
    st.caption(" · ".join(parts))


main()
