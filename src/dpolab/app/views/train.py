"""Train: a form over `dpolab train` (its options, defaults and help texts: `dpolab.app.train_form`), the equivalent
command and YAML, and "Start", which runs exactly that command as a background job (`dpolab.jobs`): it outlives the
tab and the server, and a second tab sees it rather than starting it twice. The job panel below watches the selected
train job (by default the running one, else the newest) through the run folder's progress: a progress bar with ETA,
live curves, the log, Stop (a clean stop at the next step with a complete checkpoint) and Resume.

UI only: validation is `TrainConfig`'s, the plan is `engine.train.dry_run`, the output-folder checks are the run
folder's own (`RunFolder.check`, what the CLI runs before training), and the run is read through `RunFolder`."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from dpolab import EMBEDDED_MODEL
from dpolab.app import train_form as tf
from dpolab.app.common import fmt_duration, fmt_time, runs_root
from dpolab.errors import DpolabError
from dpolab.folders import owner
from dpolab.folders.catalog import folders_under, model_folders
from dpolab.folders.run import RunFolder
from dpolab.jobs import Job, JobError, find_job, list_jobs, log_progress, log_tail, read_job, start_job, stop_job

OTHER = "Other (path or Hub id)…"
ss = st.session_state


# ------------------------------------------------------------------------------------------------------ choices
def prepared_folders(root: Path) -> list[str]:
    """Prepared data folders directly under the runs root (what the Data page writes), newest first."""
    from dpolab.data.prepare import is_prepared

    return [str(path) for path in folders_under(root, is_prepared)]


def suggest_name(root: Path, base: str) -> str:
    """`base`, or `base-2`, `base-3`, … : the first name under the runs root that is free."""
    n, name = 1, base
    while (root / name).exists():
        n += 1
        name = f"{base}-{n}"
    return name


def output_problem(name: str) -> str | None:
    name = name.strip()
    if not name:
        return "Output folder: give the run folder a name"
    if name in (".", "..") or name.startswith(".") or "/" in name or "\\" in name:
        return f"Output folder: {name!r} must be a plain folder name (the run is written under the runs root)"
    return None


# ------------------------------------------------------------------------------------------------------ the form
def widget(field: tf.Field, where=st):
    """The widget of one form field, with the CLI's help text and the config's default."""
    key, help_text = f"train_{field.option}", field.help
    default = field.default
    if field.widget == "select":
        choices = list(field.choices)
        return where.selectbox(field.label, choices, index=choices.index(default), key=key, help=help_text)
    if field.widget == "onoff":
        choices = list(field.choices)
        return where.selectbox(field.label, choices, index=choices.index(default), key=key, help=help_text)
    if field.widget == "multiselect":
        return where.multiselect(field.label, list(field.choices), default=default, key=key, help=help_text)
    if field.widget == "int":
        return where.number_input(field.label, value=int(default), step=1, key=key, help=help_text)
    if field.widget == "float":
        return where.number_input(field.label, value=float(default), format="%g", key=key, help=help_text)
    # text and optional_float: empty means "the default"
    return where.text_input(field.label, value="" if default is None else str(default), key=key, help=help_text,
                            placeholder="default")


def model_field(root: Path) -> str:
    field = tf.BY_OPTION["model"]
    choices = [EMBEDDED_MODEL, *map(str, model_folders(root)), OTHER]  # what `--model` takes as they are
    choice = st.selectbox("Model", choices, key="train_model_choice",
                          help=f"{field.help} Runs under the runs root that hold a model are listed too.")
    if choice != OTHER:
        return choice
    typed = st.text_input("Model path or Hub id", key="train_model", placeholder="runs/my-run, ./model, org/name")
    if typed.strip():
        from dpolab.models import resolve_model

        try:
            st.caption(f"→ `{resolve_model(typed.strip())}`")
        except DpolabError as exc:
            st.error(f"Model (--model): {exc}")
    return typed.strip()


def dataset_field(root: Path) -> str:
    field = tf.BY_OPTION["dataset"]
    choices = ["demo", *prepared_folders(root), OTHER]
    wanted = st.query_params.get("data")  # the Data page's "Train on this data" link
    if wanted in choices and "train_dataset_choice" not in ss:
        ss["train_dataset_choice"] = wanted
    choice = st.selectbox("Dataset", choices, key="train_dataset_choice",
                          help=f"{field.help} 'demo' is the built-in demo set; prepared folders under the runs root "
                               "are listed.")
    if choice != OTHER:
        return choice
    typed = st.text_input("Dataset path or Hub id", key="train_dataset",
                          placeholder="data.jsonl, a folder, or org/dataset")
    typed = typed.strip()
    if typed:
        path = Path(typed).expanduser()
        if path.exists():
            typed = str(path.resolve())  # the job runs elsewhere than the server's working directory might suggest
            st.caption(f"→ `{typed}`")
        else:
            st.caption("not a local path: read as a Hugging Face Hub dataset id")
    return typed


def form(root: Path) -> tuple[dict, str]:
    """Render the form; the values by CLI option name, and the output folder's name."""
    values: dict = {}
    left, right = st.columns(2)
    with left:
        values["method"] = widget(tf.BY_OPTION["method"])
    with right:
        name = st.text_input("Output folder", value=suggest_name(root, "dpo"), key="train_output",
                             help=f"The run folder's name under the runs root ({root}); `--output-dir`.")
    method = values["method"]
    left, right = st.columns(2)
    with left:
        values["model"] = model_field(root)
    with right:
        values["dataset"] = dataset_field(root)
    basic = [f for f in tf.FIELDS if not f.advanced and f.option not in ("method", "model", "dataset", "loss_type")
             and tf.applies(f, method)]
    columns = st.columns(3)
    for i, field in enumerate(basic):
        values[field.option] = widget(field, columns[i % 3])
    if tf.applies(tf.BY_OPTION["loss_type"], method):  # a list of names: a row of its own
        values["loss_type"] = widget(tf.BY_OPTION["loss_type"])
    with st.expander("Advanced options"):
        advanced = [f for f in tf.FIELDS if f.advanced and tf.applies(f, method)]
        columns = st.columns(3)
        for i, field in enumerate(advanced):
            values[field.option] = widget(field, columns[i % 3])
        st.caption("Options the form does not show (evaluation and save schedule, warmup, …) are set in a YAML config: "
                   "`dpolab train --config FILE` (the YAML below is a start).")
    return values, name.strip()


def folder_state(out: Path, dataset: str) -> tuple[list[str], bool, bool]:
    """What the output folder allows: problems (one line each), and whether overwrite / resume are offered (only for
    a dpolab run folder: the CLI's --overwrite replaces nothing else)."""
    run = RunFolder(out)
    is_run = out.is_dir() and owner.kind_of(out) == "run"
    offer_overwrite = is_run and (run.is_finished() or run.has_checkpoints())
    offer_resume = is_run and run.has_checkpoints() and not run.is_finished()
    overwrite = offer_overwrite and ss.get("train_overwrite", False)
    resume = offer_resume and not overwrite and ss.get("train_resume_form", False)
    try:
        run.check(resume=resume, overwrite=overwrite, inputs=[dataset] if dataset else ())
        problems = []
    except DpolabError as exc:
        problems = [f"Output folder: {exc}"]
    return problems, offer_overwrite, offer_resume


def show_preview(out: Path, problem: str | None, argv, values: dict, problems: list[str], refusals: list[str],
                 running: Job | None) -> None:
    """The equivalent command and YAML, the form's problems, and a job already writing the folder."""
    st.caption(f"Run folder: `{out}`" if problem is None else "Run folder: –")
    with st.container(key="train_preview"):
        st.markdown("**Equivalent command**")
        st.code(tf.command(argv) if argv else "–", language="bash", wrap_lines=True)
        with st.expander("YAML config (`dpolab train --config FILE`)"):
            try:
                st.code(tf.to_yaml(values, out), language="yaml")
            except ValueError as exc:
                st.code(f"# {exc}", language="yaml")
    with st.container(key="train_problems"):
        for line in problems:
            st.error(line)
        for line in refusals:
            st.warning(line)
    if running is not None:
        st.info(f"A job is already writing this folder (job {running.id}, {running.status}): it is shown in the Job "
                "panel. Choose another output folder to start a new run.")



def start_section(root: Path, values: dict, name: str) -> None:
    problem = output_problem(name)
    out = root / name if problem is None else root / "_"
    cfg, problems = tf.validate(values, out)
    if problem:
        problems.insert(0, problem)
    overwrite = resume = False
    refusals: list[str] = []  # what the output folder refuses (a warning: the form itself is fine)
    running = find_job(root, out, active_only=True) if problem is None else None
    if problem is None and running is None:
        folder_problems, offer_overwrite, offer_resume = folder_state(out, values.get("dataset", ""))
        if offer_overwrite or offer_resume:
            if offer_resume:
                resume = st.checkbox("Resume from its last checkpoint (--resume)", key="train_resume_form")
            overwrite = st.checkbox("Overwrite the run in this folder (--overwrite)", key="train_overwrite",
                                    help="Deletes the run folder's contents first (a dpolab run folder only).")
            resume = resume and not overwrite
            folder_problems, _, _ = folder_state(out, values.get("dataset", ""))
        refusals = folder_problems
    try:
        argv = tf.build_argv(values, out, resume=resume, overwrite=overwrite)
    except ValueError:
        argv = None

    show_preview(out, problem, argv, values, problems, refusals, running)
    blocked = bool(problems or refusals) or running is not None
    left, right = st.columns([1, 1])
    start = left.button("Start", key="train_start", type="primary", disabled=blocked,
                        help="Start `dpolab train` with these options as a background job (it keeps running when "
                             "the tab closes).")
    check = right.button("Check (dry run)", key="train_check", disabled=cfg is None,
                         help="Validate and plan (steps, memory) as `dpolab train --dry-run` does; loads no weights.")
    if check and cfg is not None:
        from dpolab.engine.train import dry_run

        with st.spinner("Planning…"):
            try:
                ss["train_plan"] = (argv, dry_run(cfg))
            except DpolabError as exc:
                ss["train_plan"] = (argv, {"error": str(exc).splitlines()[0]})
    plan = ss.get("train_plan")
    if plan and plan[0] == argv:
        show_plan(plan[1])
    if start and not blocked and argv:
        try:
            job = start_job(root, "train", out, argv)
        except (JobError, OSError) as exc:
            st.error(f"Not started: {exc}")
            if (other := find_job(root, out, active_only=True)) is not None:
                ss["train_job_pending"] = other.id
        else:
            ss["train_job_pending"] = job.id
            for key in ("train_overwrite", "train_resume_form"):
                ss.pop(key, None)
            st.rerun()


def show_plan(result: dict) -> None:
    with st.container(key="train_plan"):
        if "error" in result:
            st.error(f"Dry run: {result['error']}")
            return
        plan = result.get("plan", {})
        cols = st.columns(3)
        cols[0].metric("Total steps", plan.get("total_steps", "–"))
        params = plan.get("model_parameters")
        cols[1].metric("Model parameters", f"{params / 1e6:.1f} M" if isinstance(params, (int, float)) else "–")
        cols[2].metric("Training pairs", plan.get("train_pairs", plan.get("train_examples", "–")))
        for what, why in (result.get("unavailable_offline") or {}).items():
            st.warning(f"{what}: {why}")
        with st.expander("The whole plan"):
            st.json(plan)


# ------------------------------------------------------------------------------------------------------ job panel
def draw_curves(history: list[dict]) -> None:
    import altair as alt
    import pandas as pd

    data = {chart: tf.thin(points) for chart, points in tf.curves(history).items()}
    if not data:
        st.caption("Curves appear after the first logged step.")
        return
    cols = st.columns(2)
    for i, (chart, points) in enumerate(data.items()):
        frame = pd.DataFrame(points)
        base = alt.Chart(frame).encode(x=alt.X("step:Q", title="step"), y=alt.Y("value:Q", title=None),
                                       color=alt.Color("series:N", title=None, legend=alt.Legend(orient="bottom", columns=2)),
                                       tooltip=["step", "series", "value"])
        layers = [base.mark_line()]
        if frame["eval"].any():  # evaluations are few: points, so that a single one shows
            layers.append(base.transform_filter(alt.datum.eval).mark_point(filled=True, size=60))
        with cols[i % 2].container(key=f"train_chart_{chart}"):
            st.markdown(f"**{tf.CURVES[chart][0]}**")
            st.altair_chart(alt.layer(*layers).properties(height=220), width="stretch")


def error_line(job: Job) -> str:
    lines = log_tail(job).splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    line = errors[-1] if errors else (lines[-1] if lines else f"exit code {job.exit_code}")
    return line.removeprefix("error:").strip()


STATUS_COLOR = {"starting": "blue", "running": "blue", "stopping": "orange", "finished": "green", "failed": "red",
                "stopped": "orange"}


def show_metrics(run: RunFolder) -> None:
    """The run's final metrics (metrics.json, as `dpolab train` prints them), then where to go next."""
    metrics = run.read_metrics() or {}
    best = metrics.get("best") or {}
    shown = []  # (label, value), three to a row: the job panel is half the page
    if best:
        acc = best.get("rewards/accuracies", best.get("accuracy"))  # a reward model logs accuracy, margin
        margin = best.get("rewards/margins", best.get("margin"))
        shown += [("Eval loss (best)", f"{best['loss']:.4f}"), ("Reward accuracy", "–" if acc is None else f"{acc:.3f}"),
                  ("Reward margin", "–" if margin is None else f"{margin:.4f}")]
    if "train_loss" in metrics:
        shown.append(("Train loss", f"{metrics['train_loss']:.4f}"))
    if "global_step" in metrics:
        shown.append(("Steps", metrics["global_step"]))
    if "total_time_s" in metrics:
        shown.append(("Time", fmt_duration(metrics["total_time_s"])))
    if "pairs_per_second" in metrics:
        shown.append(("Pairs/s", f"{metrics['pairs_per_second']:.2f}"))
    if "best_epoch" in metrics and best:
        shown.append(("Best epoch", f"{metrics['best_epoch']:.2f}"))
    with st.container(key="train_metrics"):
        for row in range(0, len(shown), 3):
            for column, (label, value) in zip(st.columns(3), shown[row:row + 3]):
                column.metric(label, value)
    st.caption(f"Model: `{run.model_dir}`")
    st.page_link("views/runs.py", label="Compare it on the Runs page", icon=":material/table_rows:")
    st.page_link("views/publish.py", label="Publish it", icon=":material/publish:",
                 query_params={"model": str(run.path)})
    st.page_link("views/chat.py", label="Chat with it", icon=":material/forum:",
                 query_params={"model": str(run.path)})  # a link: a click is never lost to a rerun


def job_controls(root: Path, job: Job, run: RunFolder) -> None:
    newest = find_job(root, job.target)
    if job.status in ("starting", "running"):
        if st.button("Stop", key="train_stop", icon=":material/stop:",
                     help="A clean stop at the next step: a complete checkpoint is saved; Resume continues from it."):
            stop_job(read_job(job.folder))
            st.rerun()
    elif job.status == "stopping":
        st.info("Stopping at the next step (saving a complete checkpoint)…")
    elif job.status in ("stopped", "failed") and run.has_checkpoints() and not run.is_finished():
        if newest is not None and newest.id != job.id:
            st.caption(f"A newer job ({newest.id}, {newest.status}) continues this run.")
        elif st.button("Resume", key="train_resume", icon=":material/play_arrow:",
                       help="Continue from the last complete checkpoint (the same command with --resume)."):
            try:
                resumed = start_job(root, "train", job.target, tf.resume_argv(job.argv))
            except (JobError, OSError) as exc:
                st.error(f"Not resumed: {exc}")
            else:
                ss["train_job_pending"] = resumed.id
                st.rerun()


def _pin() -> None:
    ss["train_job_pinned"] = ss["train_job_pick"]


def panel_body(root: Path) -> None:
    jobs = [j for j in list_jobs(root) if j.kind == "train"]
    if not jobs:
        st.caption(f"No training job under `{root}` yet: the job you start appears here.")
        ss["train_panel_active"] = False
        return
    ids = {j.id: j for j in jobs}
    pending = ss.pop("train_job_pending", None)
    if pending in ids:
        ss["train_job_pick"] = pending
    if ss.get("train_job_pick") not in ids:  # first visit: the running job, else the newest
        ss["train_job_pick"] = next((j.id for j in jobs if j.active), jobs[0].id)
    elif ss.get("train_job_pinned") != ss["train_job_pick"]:
        # Follow the run: a newer job on the same folder (a Resume from another tab) replaces the one watched, unless
        # the user picked this one in the list.
        watched = ids[ss["train_job_pick"]]
        ss["train_job_pick"] = next(j.id for j in jobs if j.target == watched.target)
    job_id = st.selectbox("Job", list(ids), key="train_job_pick", on_change=_pin,
                          format_func=lambda i: f"{ids[i].target.name} · {ids[i].status} · {fmt_time(ids[i].started)}")
    job = ids[job_id]
    run = RunFolder(job.target)
    with st.container(key="train_status"):
        cols = st.columns([1, 4])
        with cols[0]:
            st.badge(job.status, color=STATUS_COLOR.get(job.status, "gray"))
        cols[1].markdown(f"`{job.target}` · started {fmt_time(job.started)} · {fmt_duration(job.duration_s)}")
    progress = run.read_progress()
    with st.container(key="train_progress"):
        if progress is not None and progress.max_steps:
            eta = f" · ETA {fmt_duration(progress.eta_s)}" if job.active and progress.eta_s is not None else ""
            epoch = f" · epoch {progress.epoch:.2f}" if progress.epoch is not None else ""
            st.progress(progress.fraction, text=f"Step {progress.step} of {progress.max_steps}{epoch}{eta}")
        elif job.active:
            bar = log_progress(job)
            if bar is not None:
                st.progress(bar[0], text=f"Preparing: {bar[1]}")
            else:
                st.progress(0.0, text="Starting: loading the model and the data…")
    if job.status == "failed":
        st.error(f"Failed: {error_line(job)}")
    elif job.status == "stopped":
        at = f" at step {progress.step} of {progress.max_steps}" if progress else ""
        st.info(f"Stopped{at}: a complete checkpoint is in `{run.checkpoints_dir}`."
                + (" Resume continues from it." if run.has_checkpoints() and not run.is_finished() else ""))
    elif job.status == "finished":
        st.success(f"Finished in {fmt_duration(job.duration_s)}.")
    job_controls(root, job, run)
    if job.status == "finished" and run.is_finished():
        show_metrics(run)
    draw_curves(progress.history if progress else [])
    with st.expander("Command and log"):
        st.code(job.command, language="bash", wrap_lines=True)
        with st.container(key="train_log"):
            st.code(log_tail(job) or "(no output yet)", language=None)
    # A job that just ended: one full rerun, so that the form's checks see the folder as it is now, and the panel
    # stops polling.
    was_active, ss["train_panel_active"] = ss.get("train_panel_active"), job.active
    if was_active and not job.active:
        st.rerun()


def job_panel(root: Path) -> None:
    jobs = [j for j in list_jobs(root) if j.kind == "train"]
    watch = {j.id: j for j in jobs}.get(ss.get("train_job_pending") or ss.get("train_job_pick"))
    live = watch.active if watch is not None else any(j.active for j in jobs)
    # Polls once a second only while the watched job runs; only this panel reruns (the form stays as typed).
    st.fragment(run_every=1.0 if live else None)(panel_body)(root)


# ------------------------------------------------------------------------------------------------------ page
def main() -> None:
    root = runs_root()
    st.title("Train")
    st.caption(f"Runs root: `{root}`. A run started here is a `dpolab train` job: it keeps running when this tab "
               "closes, and every tab shows it.")
    form_col, job_col = st.columns([1, 1], gap="large")
    with form_col:
        values, name = form(root)
        start_section(root, values, name)
    with job_col:
        st.subheader("Job")
        with st.container(key="train_job_panel"):
            job_panel(root)


main()
