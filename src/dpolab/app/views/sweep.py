"""Sweep: define a search space (a form, or a pasted / uploaded sweep YAML), preview the YAML, launch `dpolab sweep`
as a background job, and watch its trials live; the best trial is highlighted, with its best/ one click away in Chat
and Publish; Stop and Resume. UI only: the config is validated by `SweepConfig` (through `load_config`), the sweep
runs as a job (`dpolab.jobs`), and the trials are read from the sweep's folder and study (`dpolab.sweep.report`).

Launch writes the sweep's YAML to RUNS/<name>.sweep.yaml (what `dpolab sweep --config` reads; only the options
set, so defaults stay defaults) and starts `dpolab sweep --config RUNS/<name>.sweep.yaml` writing RUNS/<name>/.
Resume re-runs the same command: a sweep's study resumes where it stopped, and a trial cut off is retried."""

from __future__ import annotations

import re
from pathlib import Path
from typing import get_args

import pandas as pd
import streamlit as st
import yaml

from dpolab import EMBEDDED_MODEL
from dpolab.app.common import fmt_duration, fmt_time, runs_root
from dpolab.config import Method, Template, load_config
from dpolab.errors import DpolabError
from dpolab.folders.catalog import scan
from dpolab.folders.sweep import SweepFolder
from dpolab.jobs import JobError, log_tail, start_job, stop_job
from dpolab.sweep.config import SweepConfig

YAML_SUFFIX = ".sweep.yaml"
# Options the form can search over: (option, kind, default values, help). Values: "a, b, c" (categorical) or
# "low..high" (a range: log-scaled for the learning rate).
SPACE = (
    ("learning_rate", float, "2e-6, 5e-6, 1e-5", "AdamW learning rate."),
    ("beta", float, "0.05, 0.1, 0.2", "β: DPO/KTO/SimPO/CPO temperature; ORPO's λ."),
    ("batch_size", int, "4, 8", "Pairs per device per step."),
    ("epochs", float, "1, 2", "Epochs per trial."),
    ("label_smoothing", float, "0.0, 0.1", "ε: label noise (robust, exo_pair, aot*, simpo, cpo)."),
)
LOG_SCALED = {"learning_rate"}
EXAMPLE = Path(__file__).resolve().parents[4] / "configs" / "sweep-demo.yaml"
OBJECTIVES = ("eval_loss", "eval_rewards/accuracies")  # the judge objectives need a judge model: load a YAML for them
STATE = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running", "WAITING": "waiting"}


class FormError(ValueError):
    pass


def parse_values(name: str, kind: type, text: str) -> dict:
    """A search-space entry from "a, b, c" or "low..high"; FormError naming the option when it is not one."""
    text = text.strip()
    try:
        if ".." in text:
            low, high = (kind(part.strip()) for part in text.split("..", 1))
            return {"type": "int" if kind is int else "float", "low": low, "high": high,
                    **({"log": True} if name in LOG_SCALED else {})}
        values = [kind(part.strip()) for part in text.split(",") if part.strip()]
    except ValueError:
        raise FormError(f"search space {name}: {text!r} is not a list of {kind.__name__}s ('a, b, c') or a range "
                        "('low..high')") from None
    if not values:
        raise FormError(f"search space {name}: give values ('a, b, c') or a range ('low..high')")
    return {"type": "categorical", "choices": values}


def form_tree() -> dict:
    """The sweep config the form describes (only what it sets; sweep_dir is added at launch)."""
    st.markdown("**Base training config**")
    a, b, c = st.columns(3)
    model = a.text_input("Model", EMBEDDED_MODEL, key="sweep_model",
                         help="Policy model: the embedded name, a local folder or a Hub id.")
    dataset = b.text_input("Data", "demo", key="sweep_dataset",
                           help="'demo', a prepared folder, a local file/folder or a Hub dataset id.")
    template = c.selectbox("Template", get_args(Template), key="sweep_template",
                           help="qa: 'Q: … A: …'; raw: text as is; chat: the tokenizer's template.")
    a, b, c, d = st.columns(4)
    limit = a.number_input("Rows (0 = all)", 0, None, 120, key="sweep_limit",
                           help="Read at most this many rows (a quick sweep).")
    max_length = b.number_input("Max length", 16, 32768, 512, key="sweep_max_length",
                                help="Max tokens of prompt+response.")
    method = c.selectbox("Method", [m for m in get_args(Method) if m != "reward"], key="sweep_method",
                         help="dpo (a frozen reference) | simpo | cpo | orpo (reference-free) | kto.")
    max_steps = d.number_input("Max steps (-1 = by epochs)", -1, None, -1, key="sweep_max_steps",
                               help="Stop each trial after this many optimizer steps.")
    st.markdown("**Search space** — values `a, b, c`, or a range `low..high`")
    space = {}
    for name, kind, default, help_text in SPACE:
        left, right = st.columns([1, 3])
        on = left.checkbox(name, value=name == "learning_rate", key=f"sweep_space_{name}", help=help_text)
        text = right.text_input(f"{name} values", default, key=f"sweep_space_{name}_values", disabled=not on,
                                label_visibility="collapsed")
        if on:
            space[name] = parse_values(name, kind, text)
    st.markdown("**Search**")
    a, b, c, d, e = st.columns(5)
    sampler = a.selectbox("Sampler", ("grid", "tpe", "random"), key="sweep_sampler",
                          help="grid: every combination of the listed values; tpe / random: sampled.")
    n_trials = b.number_input("Trials", 1, 1000, 3, key="sweep_n_trials", help="Finished trials wanted.")
    objective = c.selectbox("Objective", OBJECTIVES, key="sweep_objective",
                            help="Selected by the trials' evaluations: eval loss is minimized, accuracy maximized.")
    pruner = d.selectbox("Pruner", ("median", "none"), key="sweep_pruner",
                         help="median: stop a trial whose evaluation is worse than the median of the others'.")
    seed = e.number_input("Seed", 0, None, 0, key="sweep_seed")
    base = {"model": model.strip(), "data": {"dataset": dataset.strip(), "template": template,
                                             "max_length": int(max_length)},
            "method": method, "eval_every": "epoch"}
    if limit:
        base["data"]["limit"] = int(limit)
    if max_steps != -1:
        base["max_steps"] = int(max_steps)
    return {"sampler": sampler, "n_trials": int(n_trials), "objective": objective, "pruner": pruner,
            "seed": int(seed), "search_space": space, "base": base}


def yaml_tree() -> dict:
    """The sweep config of a pasted or uploaded YAML."""
    upload = st.file_uploader("Load a sweep YAML", type=["yaml", "yml"], key="sweep_yaml_file")
    if upload is not None and st.session_state.get("_sweep_upload") != upload.file_id:
        st.session_state["_sweep_upload"] = upload.file_id
        st.session_state["sweep_yaml"] = upload.getvalue().decode("utf-8", errors="replace")
    if "sweep_yaml" not in st.session_state:  # start from the shipped example, when running from a checkout
        st.session_state["sweep_yaml"] = EXAMPLE.read_text() if EXAMPLE.is_file() else ""
    text = st.text_area("Sweep YAML", key="sweep_yaml", height=360,
                        help="A `dpolab sweep --config` file: base training config, search_space, sampler, "
                             "n_trials, objective. Its sweep_dir is replaced by the runs root and the name above.")
    try:
        tree = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise FormError(f"not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(tree, dict):
        raise FormError(f"expected a mapping at the top level, found {type(tree).__name__}")
    return tree


def launch(root: Path, name: str, text: str) -> None:
    """Write RUNS/<name>.sweep.yaml and start `dpolab sweep` on it (a button callback)."""
    target = root / name
    if target.exists() and any(target.iterdir()):
        st.session_state["_sweep_error"] = (f"{target} already exists; choose another name, or pick it under "
                                            "Sweeps and Resume it")
        return
    root.mkdir(parents=True, exist_ok=True)
    config = root / f"{name}{YAML_SUFFIX}"
    config.write_text(text)
    try:
        start_job(root, "sweep", target, ["sweep", "--config", str(config)])
    except JobError as exc:
        st.session_state["_sweep_error"] = str(exc)
        return
    st.session_state["_sweep_error"] = None
    st.session_state["sweep_pick"] = name


def new_sweep(root: Path) -> None:
    st.subheader("New sweep")
    name = st.text_input("Name", "sweep", key="sweep_name",
                         help=f"The sweep's folder under the runs root: `{root}/NAME`.").strip()
    source = st.radio("Define by", ("Form", "YAML"), key="sweep_source", horizontal=True,
                      help="Fill the form, or paste / load a sweep YAML (as `dpolab sweep --config` reads).")
    problem, text = None, ""
    try:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name or ""):
            raise FormError("name: use letters, digits, '.', '_' or '-' (it names a folder under the runs root)")
        tree = form_tree() if source == "Form" else yaml_tree()
        tree = {"sweep_dir": str(root / name), **{k: v for k, v in tree.items() if k != "sweep_dir"}}
        load_config(SweepConfig, None, tree)  # every check `dpolab sweep` makes, one line naming the field
        text = yaml.safe_dump(tree, sort_keys=False)
    except (FormError, DpolabError) as exc:
        problem = str(exc)
    if problem:
        st.error(problem, icon=":material/error:")
    else:
        with st.expander("YAML preview", expanded=True):
            st.code(text, language="yaml")
            st.caption(f"Launch writes it to `{root / (name + YAML_SUFFIX)}` and runs "
                       f"`dpolab sweep --config {root / (name + YAML_SUFFIX)}`.")
    st.button("Launch", key="sweep_launch", type="primary", icon=":material/rocket_launch:", disabled=bool(problem),
              on_click=launch, args=(root, name, text))
    if st.session_state.get("_sweep_error"):
        st.error(st.session_state["_sweep_error"], icon=":material/error:")


def resume_argv(root: Path, entry) -> list[str]:
    if entry.job is not None:
        return list(entry.job.argv)
    ours = root / f"{entry.name}{YAML_SUFFIX}"
    return ["sweep", "--config", str(ours if ours.is_file() else SweepFolder(entry.path).config_file)]


def trials(entry) -> tuple[pd.DataFrame | None, dict | None, str | None]:
    """(trials table, best.json, why there is no table) of a sweep, read from its folder and study."""
    from dpolab.sweep.report import load_sweep, trial_rows

    folder = SweepFolder(entry.path)
    if not folder.journal_file.is_file():
        return None, None, "No trials yet (preparing the shared data)." if entry.status == "running" else "No trials."
    try:
        cfg, study = load_sweep(entry.path)
        rows = trial_rows(cfg, study)
    except (DpolabError, OSError, ValueError) as exc:
        return None, None, f"Cannot read the study: {exc}"
    best = folder.read_best()
    materialised = folder.best_is_here() and \
        (SweepFolder.is_sweep_with_best(entry.path) and best is not None)
    table = []
    for row in rows:
        is_best = best is not None and row["trial"] == best["trial"]
        table.append({
            "trial": row["trial"], "state": STATE.get(row["state"], row["state"].lower()),
            **{k.removeprefix("param:"): v for k, v in row.items() if k.startswith("param:")},
            "objective": row["value"], "eval loss": row["eval_loss"], "accuracy": row["eval_accuracy"],
            "seconds": row["duration_s"], "best": ("★ best/" if materialised else "★") if is_best else "",
        })
    return pd.DataFrame(table), best, None


def best_panel(entry, folder: SweepFolder, best: dict) -> None:
    """The best trial, highlighted, with its best/ one click away in Chat and Publish."""
    with st.container(key="sweep_best"):
        here = SweepFolder.is_sweep_with_best(entry.path)
        where = f"best/ at `{folder.best_dir}`" if here else "best/ is on the machine that ran it"
        params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in best["params"].items())
        st.success(f"Best: trial {best['trial']} · {best['objective']} = {best['value']:.4f} · {params} · {where}",
                   icon=":material/star:")
        if here:
            left, right, _ = st.columns([2, 1, 2])
            # Links, not buttons: the panel is redrawn while the sweep job winds down, and a click that lands during
            # a rerun is lost for a button, never for a link.
            left.page_link("views/chat.py", label="Chat with the best trial", icon=":material/forum:",
                           query_params={"model": str(entry.path)})
            right.page_link("views/publish.py", label="Publish it", icon=":material/publish:",
                            query_params={"model": str(entry.path)})


def watch(root: Path, entry) -> None:
    folder = SweepFolder(entry.path)
    job = entry.job
    took = f", {fmt_duration(entry.duration_s)}" if entry.duration_s is not None else ""
    started = f" · started {fmt_time(entry.started)}{took}" if entry.started else ""
    st.markdown(f"`{entry.path}` · **{entry.status}**{started}")
    left, right, _ = st.columns([1, 1, 4])
    if entry.status in ("running", "stopping"):
        if job is not None:
            left.button("Stop", key="sweep_stop", icon=":material/stop:", on_click=stop_job, args=(job,),
                        disabled=entry.status == "stopping", help="Stop the sweep (the trial in hand is cut off and "
                        "retried on Resume).")
    elif entry.status in ("stopped", "failed"):
        argv = resume_argv(root, entry)
        if right.button("Resume", key="sweep_resume", icon=":material/play_arrow:",
                        help=f"Run `dpolab {' '.join(argv)}` again: the study goes on where it stopped."):
            try:
                start_job(root, "sweep", entry.path, argv)
                st.rerun()
            except JobError as exc:
                st.error(str(exc))
    table, best, why = trials(entry)
    n_trials = None
    try:
        n_trials = folder.read_config_tree().get("n_trials")
    except DpolabError:
        pass
    if table is not None and not table.empty:
        done = int(table["state"].isin(["complete", "pruned"]).sum())
        if n_trials:
            st.progress(min(done / n_trials, 1.0), text=f"{done}/{n_trials} trials finished")
        running = table[table["state"] == "running"]
        for number in running["trial"]:
            progress = folder.trial(int(number)).read_progress()
            if progress is not None:
                st.progress(progress.fraction, text=f"trial {number}: step {progress.step}/{progress.max_steps or '?'}")
        best_rows = table.index[table["best"] != ""].tolist()
        styled = table.style.apply(
            lambda r: ["background-color: rgba(255, 215, 0, 0.25)" if r.name in best_rows else "" for _ in r], axis=1)
        st.dataframe(styled, key="sweep_trials", hide_index=True, width="stretch",
                     column_config={"objective": st.column_config.NumberColumn(format="%.4f"),
                                    "eval loss": st.column_config.NumberColumn(format="%.4f"),
                                    "accuracy": st.column_config.NumberColumn(format="%.3f"),
                                    "seconds": st.column_config.NumberColumn(format="%.1f")})
    else:
        st.caption(why or "No trials yet.")
    if best is not None:
        best_panel(entry, folder, best)
    if job is not None:
        if job.status == "failed":
            st.error(f"`{job.command}` failed (exit {job.exit_code}); see its log.")
        with st.expander(f"Log ({job.status})", expanded=job.status == "failed"):
            st.code(log_tail(job) or "(no output yet)", language=None)


def sweeps_section(root: Path) -> None:
    st.subheader("Sweeps")
    entries = [e for e in scan(root) if e.kind == "sweep"]  # read anew on every refresh
    names = [e.name for e in entries]
    if st.session_state.get("sweep_pick") not in names:
        st.session_state["sweep_pick"] = names[0]
    name = st.selectbox("Sweep", names, key="sweep_pick")
    entry = next(e for e in entries if e.name == name)
    watch(root, entry)
    live = entry.status in ("running", "stopping")
    if live != st.session_state.get("_sweep_live", False):
        st.session_state["_sweep_live"] = live
        st.rerun()  # the whole page: switch the fragment's refresh on or off


st.title("Sweep")
ROOT = runs_root()
st.caption(f"Runs root: `{ROOT}`")
if any(e.kind == "sweep" for e in scan(ROOT)):
    st.fragment(sweeps_section, run_every=1.0 if st.session_state.get("_sweep_live") else None)(ROOT)
else:
    st.info("No sweeps under the runs root yet: define one below and Launch it.", icon=":material/info:")
new_sweep(ROOT)
