"""How the Data and Publish pages show a background job (`dpolab.jobs`): status line, progress bar, command, log tail,
and a Stop button while it runs. Everything shown is read from the job's files, so every tab sees the same job.
UI only: starting, stopping and reading jobs is `dpolab.jobs`."""

from __future__ import annotations

import streamlit as st

from dpolab.app.common import fmt_duration
from dpolab.jobs import Job, log_progress, log_tail, stop_job

# Streamlit's own (bundled) icon font: emoji need a font the machine may not have.
STATUS_ICON = {"starting": ":material/hourglass_top:", "running": ":material/progress_activity:",
               "stopping": ":material/pause_circle:", "finished": ":material/check_circle:",
               "failed": ":material/error:", "stopped": ":material/stop_circle:"}


def last_line(job: Job, scrub: str | None = None) -> str:
    """The last line the job printed (its one-line error when it failed)."""
    lines = [line for line in log_tail(job, 2000).splitlines() if line.strip()]
    text = lines[-1] if lines else ""
    return text.replace(scrub, "***") if scrub else text


def show_job(job: Job, key: str, scrub: str | None = None) -> None:
    """Status, progress, command and log of `job` in a container keyed `key` (CSS class st-key-KEY); its Stop
    button is `{key}_stop`."""
    with st.container(key=key):
        _show_job(job, key, scrub)


def _show_job(job: Job, key: str, scrub: str | None) -> None:
    icon = STATUS_ICON.get(job.status, "")
    st.markdown(f"{icon} **{job.kind}** job `{job.id}` · **{job.status}** · {fmt_duration(job.duration_s)}")
    progress = log_progress(job)
    if job.status == "finished":
        st.progress(1.0, text="done")
    elif job.active:
        fraction, label = progress if progress else (0.0, "starting…" if job.status == "starting" else "working…")
        st.progress(fraction, text=label)
    if job.status == "failed":
        st.error(f"{job.kind} failed: {last_line(job, scrub) or f'exit code {job.exit_code}'}")
    if job.active and st.button("Stop", key=f"{key}_stop", help="Ends the job (SIGTERM); nothing is left half-written"):
        stop_job(job)
        st.rerun()
    with st.expander("Command and log", expanded=job.status == "failed"):
        st.code(job.command, language="bash")
        tail = log_tail(job)
        st.code((tail.replace(scrub, "***") if scrub else tail) or "(no output yet)", language="text")
