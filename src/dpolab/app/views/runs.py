"""Runs: every run and sweep under the runs root in one table (`dpolab.folders.catalog.scan`: status from the folder
and its jobs), the curves of the selected ones overlaid, and one run's details: its progress, its eval report inline,
and `dpolab eval` started on it as a background job. UI only: folders are read through the folder modules, jobs
through `dpolab.jobs`.

Selecting rows in the table (`runs_table`) fills the overlay's multiselect (`runs_overlay`), which can be edited
directly too. The page reruns itself every 2 s (a fragment) while a run, a sweep or an eval job is active."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import streamlit as st

from dpolab.app.common import fmt_duration, fmt_time, runs_root
from dpolab.folders.catalog import Entry, scan
from dpolab.folders.run import RunFolder
from dpolab.folders.sweep import SweepFolder
from dpolab.jobs import JobError, find_job, log_progress, log_tail, start_job, stop_job

# Curves overlaid: (log key, title). Training points carry the first three; evaluation points eval_loss.
CURVES = (("loss", "Training loss"), ("rewards/accuracies", "Reward accuracy"), ("rewards/margins", "Reward margin"),
          ("eval_loss", "Eval loss"))



def model_run(entry: Entry) -> RunFolder | None:
    """The run folder holding the entry's model: the run itself, or a sweep's best/."""
    if entry.kind == "run":
        return RunFolder(entry.path)
    sweep = SweepFolder(entry.path)
    return RunFolder(sweep.best_dir) if SweepFolder.is_sweep_with_best(entry.path) else None


def history(entry: Entry) -> list[dict]:
    """The logged points of a run (a sweep: of its best trial): the final trainer state once finished, else what
    progress.jsonl holds so far."""
    run = model_run(entry)
    if run is None:
        return []
    if run.is_finished():
        return run.read_log_history() or []
    progress = run.read_progress()
    return progress.history if progress else []


def curve_frame(entries: list[Entry], key: str, title: str) -> pd.DataFrame:
    """Long format, (step, run, `title`): each run's own points only (no gaps where another run logged and this one
    did not), the last value logged for a step winning."""
    rows = []
    for entry in entries:
        points = {p["step"]: p[key] for p in history(entry) if p.get(key) is not None and "step" in p}
        rows += [{"step": step, "run": entry.name, title: float(value)} for step, value in sorted(points.items())]
    return pd.DataFrame(rows, columns=["step", "run", title])


def table(entries: list[Entry]) -> pd.DataFrame:
    return pd.DataFrame([{
        "name": e.name, "kind": e.kind, "status": e.status, "model": e.model,
        "method": e.method, "data": e.dataset, "best eval loss": e.best_eval_loss, "reward accuracy": e.reward_accuracy,
        "steps": e.steps, "trials": e.trials, "duration": fmt_duration(e.duration_s), "started": fmt_time(e.started),
    } for e in entries])


def sync_overlay() -> None:
    """Rows selected in the table become the overlay's choice."""
    rows = st.session_state["runs_table"]["selection"]["rows"]
    names = st.session_state.get("_runs_names", [])
    st.session_state["runs_overlay"] = [names[i] for i in rows if i < len(names)]


def empty_state(root: Path) -> None:
    with st.container(key="runs_empty"):
        st.info(f"No runs or sweeps under `{root}` yet. Train a model on the Train page (or start a sweep); it will "
                "be listed here with its status and metrics.", icon=":material/info:")
        left, right, _ = st.columns([1, 1, 3])
        left.page_link("views/train.py", label="Go to Train", icon=":material/model_training:")
        right.page_link("views/sweep.py", label="Go to Sweep", icon=":material/tune:")


def overlay(entries: list[Entry]) -> None:
    st.subheader("Compare curves")
    names = [e.name for e in entries]
    # Drop names that disappeared (a folder removed by hand) before the widget reads its state.
    st.session_state["runs_overlay"] = [n for n in st.session_state.get("runs_overlay", []) if n in names]
    chosen = st.multiselect("Runs to overlay", names, key="runs_overlay",
                            help="Select rows in the table above, or pick runs here. A sweep shows its best trial.")
    if not chosen:
        st.caption("Select two or more runs in the table to overlay their loss, reward accuracy, margins and eval loss.")
        return
    picked = [e for e in entries if e.name in chosen]
    for row in (CURVES[:2], CURVES[2:]):  # two per row, in CURVES order
        for cell, (key, title) in zip(st.columns(2), row):
            with cell:
                st.markdown(f"**{title}**")
                frame = curve_frame(picked, key, title)
                if frame.empty:
                    st.caption(f"No `{key}` points logged yet.")
                else:
                    st.line_chart(frame, x="step", y=title, color="run", height=260)


def eval_panel(entry: Entry, run: RunFolder) -> None:
    """The eval report inline, and `dpolab eval` as a job with its progress."""
    root = runs_root()
    job = find_job(root, run.path)
    job = job if job is not None and job.kind == "eval" else None
    st.markdown("**Evaluation**")
    if job is not None and job.active:
        progress = log_progress(job)
        fraction, label = progress if progress else (0.0, "starting…")
        st.progress(fraction, text=f"`dpolab eval` {job.status}: {label}")
        st.button("Stop eval", key="runs_eval_stop", icon=":material/stop:", on_click=stop_job, args=(job,))
    else:
        can = entry.status == "finished" and run.is_finished()
        left, middle, right = st.columns([1, 1, 1])
        n_prompts = left.number_input("Prompts", 0, 256, 4, key="eval_n_prompts",
                                      help="Test-split prompts sampled for generations (plus the study's two).")
        max_new = middle.number_input("Max new tokens", 1, 2048, 64, key="eval_max_new_tokens",
                                      help="Tokens generated per answer.")
        argv = ["eval", str(entry.path), "--n-prompts", str(int(n_prompts)), "--max-new-tokens", str(int(max_new))]
        right.markdown("&nbsp;")
        if right.button("Run eval", key="runs_eval_start", icon=":material/fact_check:", disabled=not can,
                        help=None if can else "Evaluation needs a finished run."):
            try:
                start_job(root, "eval", run.path, argv)
                st.rerun()
            except JobError as exc:
                st.error(str(exc))
        st.caption(f"Runs `dpolab {' '.join(argv)}` in the background; the report lands in `{run.eval_dir}`.")
    if job is not None:
        if job.status == "failed":
            st.error(f"`{job.command}` failed (exit {job.exit_code}); see its log below.")
        with st.expander(f"Eval log ({job.status})", expanded=job.active or job.status == "failed"):
            st.code(log_tail(job) or "(no output yet)", language=None)
    html, md = run.eval_dir / "report.html", run.eval_dir / "report.md"
    if html.is_file():
        with st.container(key="runs_eval_report"):
            # dpolab's own report: self-contained, every generated text HTML-escaped by the report writer.
            st.iframe(html, height=900)
    elif md.is_file():
        with st.container(key="runs_eval_report"):
            st.markdown(md.read_text())
    elif job is None or not job.active:
        st.caption("No eval report yet.")


def details(entries: list[Entry]) -> None:
    st.subheader("Details")
    names = [e.name for e in entries]
    overlay_choice = st.session_state.get("runs_overlay") or []
    if st.session_state.get("runs_detail") not in names:
        st.session_state["runs_detail"] = overlay_choice[0] if overlay_choice else names[0]
    name = st.selectbox("Run", names, key="runs_detail")
    entry = next(e for e in entries if e.name == name)
    st.markdown(f"`{entry.path}` · {entry.kind} · **{entry.status}**")
    if entry.job is not None:
        st.caption(f"Last job: `{entry.job.command}`, {entry.job.status} (started {fmt_time(entry.job.started)}, "
                   f"{fmt_duration(entry.job.duration_s)}).")
        if entry.status == "failed":
            with st.expander("Log of the failed job", expanded=True):
                st.code(log_tail(entry.job) or "(no output)", language=None)
    run = model_run(entry)
    if run is None:
        st.caption("This sweep has no best trial yet.")
        return
    if not run.is_finished():
        progress = run.read_progress()
        if progress is not None:
            eta = f", about {fmt_duration(progress.eta_s)} left" if progress.eta_s is not None and entry.job and \
                entry.job.active else ""
            st.progress(progress.fraction, text=f"step {progress.step}/{progress.max_steps or '?'}{eta}")
    metrics = run.read_metrics()
    if metrics:
        best = metrics.get("best") or {}
        cols = st.columns(4)
        cols[0].metric("Best eval loss", f"{best['loss']:.4f}" if best.get("loss") is not None else "–")
        accuracy = best.get("rewards/accuracies")
        cols[1].metric("Reward accuracy", f"{accuracy:.3f}" if accuracy is not None else "–")
        margin = best.get("rewards/margins")
        cols[2].metric("Reward margin", f"{margin:.3f}" if margin is not None else "–")
        cols[3].metric("Steps", metrics.get("global_step", "–"))
    eval_panel(entry, run)


def body() -> None:
    root = runs_root()
    entries = scan(root)
    if not entries:
        empty_state(root)
        return
    st.session_state["_runs_names"] = [e.name for e in entries]
    st.dataframe(
        table(entries), key="runs_table", on_select=sync_overlay, selection_mode="multi-row", hide_index=True,
        width="stretch",
        column_config={
            "best eval loss": st.column_config.NumberColumn(format="%.4f"),
            "reward accuracy": st.column_config.NumberColumn(format="%.3f"),
        })
    overlay(entries)
    details(entries)
    active = any(e.status in ("running", "stopping") for e in entries) or any(
        (job := find_job(root, run.path)) is not None and job.active
        for e in entries if (run := model_run(e)) is not None)
    if active != st.session_state.get("_runs_live", False):
        st.session_state["_runs_live"] = active
        st.rerun()  # the whole page, so that the fragment's refresh is switched on or off


st.title("Runs")
st.caption(f"Runs root: `{runs_root()}`")
st.fragment(body, run_every=2.0 if st.session_state.get("_runs_live") else None)()
