"""Data: pick a source, see it as training will, prepare it into a folder under the runs root.

UI only. The preview is `dpolab.data.prepare.build` (the pipeline `dpolab data prepare` runs) on the first rows of the
source, with the same options: the rows shown are the records it made (the rendered prompt and responses training
sees), the drop reasons and counts are its ledger, the token lengths are its token ids. "Prepare" runs
`dpolab data prepare` as a background job (`dpolab.jobs`) writing RUNS/<name>, and the finished folder's
data_report.json is shown through `dpolab.folders.prepared`. An upload is saved under RUNS/uploads/ (app.uploads) and
nowhere else; a local path is resolved and shown resolved.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import streamlit as st

from dpolab import EMBEDDED_MODEL
from dpolab.app.common import runs_root
from dpolab.app.jobview import show_job
from dpolab.app.uploads import UPLOADS, save_upload
from dpolab.config import DataConfig
from dpolab.data import sources
from dpolab.data.prepare import build, is_prepared
from dpolab.data.templates import TEMPLATES
from dpolab.errors import DpolabError
from dpolab.folders.prepared import PreparedFolder
from dpolab.jobs import JobError, find_job, list_jobs, start_job

SOURCES = {"demo": "Demo set", "path": "Local file or folder", "upload": "Upload", "hub": "Hub dataset"}
SHAPES = ("auto", "explicit", "hh", "conversational", "unpaired")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
FIELDS = DataConfig.model_fields
DEFAULTS = DataConfig()
EXAMPLES_PER_REASON = 3
BINS = 20


def _help(field: str) -> str | None:
    return FIELDS[field].description


def one_line(exc: BaseException) -> str:
    """A one-line message; a pydantic error names the field at fault."""
    errors = getattr(exc, "errors", None)
    if callable(errors):
        first = errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "options"
        return f"{where}: {first.get('msg', '')}".removeprefix("Value error, ")
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:400]


# ------------------------------------------------------------------------------------------------------------ source
def pick_source(root: Path) -> tuple[str | None, str]:
    """(the `--dataset` value, a default output name), or (None, …) with the reason shown when there is none yet."""
    kind = st.radio("Source", list(SOURCES), format_func=SOURCES.get, key="data_source", horizontal=True,
                    help="Where the preference rows come from.")
    if kind == "demo":
        st.caption(f"The built-in demo set: `{sources.demo_path()}`")
        return "demo", "data-demo"
    if kind == "path":
        raw = st.text_input("Path", key="data_path", placeholder="/path/to/pairs.jsonl or a folder of them",
                            help="A JSONL, JSON, Parquet or CSV file (optionally .gz), or a folder of them. "
                                 "Relative paths are taken from the folder the studio was started in.")
        if not raw.strip():
            st.info("Enter the path of a file or folder.")
            return None, ""
        path = Path(raw.strip()).expanduser().resolve()
        st.caption(f"Resolved: `{path}`")
        return str(path), _name_of(path.name)
    if kind == "upload":
        upload = st.file_uploader("Upload a file", key="data_upload", type=["jsonl", "json", "parquet", "csv", "gz"],
                                  help=f"Saved under the runs root ({root / UPLOADS}), nowhere else.")
        if upload is None:
            st.info("Upload a JSONL, JSON, Parquet or CSV file.")
            return None, ""
        path = save_upload(root, upload.name, upload.getvalue())
        st.caption(f"Saved as `{path}`")
        return str(path), _name_of(upload.name)
    hub = st.text_input("Hub dataset id", key="data_hub", placeholder="Anthropic/hh-rlhf",
                        help=_help("dataset") + " Needs the network (or the dataset in the local Hub cache).")
    st.text_input("Split", value=DEFAULTS.split, key="data_split", help=_help("split"))
    if not hub.strip():
        st.info("Enter a Hugging Face dataset id (OWNER/NAME).")
        return None, ""
    return hub.strip(), _name_of(hub.strip().replace("/", "-"))


def _name_of(text: str) -> str:
    stem = text.lower()
    for suffix in (".gz",) + sources.SUFFIXES:
        stem = stem.removesuffix(suffix)
    return "data-" + (re.sub(r"[^a-z0-9._-]+", "-", stem).strip("-.") or "source")


def options(source: str) -> DataConfig:
    """The DataConfig of the form (raises a pydantic ValidationError naming the bad field)."""
    with st.expander("Options", expanded=False):
        a, b, c = st.columns(3)
        template = a.selectbox("Template", TEMPLATES, index=TEMPLATES.index(DEFAULTS.template), key="data_template",
                               help=_help("template"))
        model = b.text_input("Tokenizer (model)", value=DEFAULTS.tokenizer, key="data_model",
                             help=_help("tokenizer") + " Use the model you will train.")
        max_length = c.number_input("Max length", min_value=9, value=DEFAULTS.max_length, step=64,
                                    key="data_max_length", help=_help("max_length"))
        a, b, c = st.columns(3)
        shape = a.selectbox("Shape", SHAPES, key="data_shape", help=_help("shape"))
        test_size = b.number_input("Test fraction", min_value=0.0, max_value=0.9, value=DEFAULTS.test_size, step=0.05,
                                   key="data_test_size", help="Fraction of the pairs held out for evaluation.")
        seed = c.number_input("Split seed", value=DEFAULTS.seed, step=1, key="data_seed", help="Seed of the split.")
        a, b, c = st.columns(3)
        cap = a.number_input("Prompt cap (0 = max length / 2)", min_value=0, value=0, step=32,
                             key="data_max_prompt_length", help=_help("max_prompt_length"))
        limit = b.number_input("Limit rows (0 = all)", min_value=0, value=0, step=100, key="data_limit",
                               help="Prepare only the first rows (for quick trials).")
        unpaired = c.toggle("Unpaired (KTO)", key="data_unpaired", help=_help("unpaired"))
        cols = st.columns(5)
        names = {}
        for col, field in zip(cols, ("prompt_column", "chosen_column", "rejected_column", "completion_column",
                                     "label_column")):
            names[field] = col.text_input(field.replace("_", " ").capitalize(), value=getattr(DEFAULTS, field),
                                          key=f"data_{field}", help=_help(field) or f"Column holding the "
                                          f"{field.removesuffix('_column')}.")
    split = st.session_state.get("data_split", DEFAULTS.split) if st.session_state.get("data_source") == "hub" \
        else DEFAULTS.split
    return DataConfig(dataset=source, split=split or DEFAULTS.split, shape=shape, template=template,
                      tokenizer=model.strip() or EMBEDDED_MODEL, max_length=int(max_length),
                      max_prompt_length=int(cap) or None, test_size=float(test_size), seed=int(seed),
                      limit=int(limit) or None, unpaired=unpaired, **{k: v.strip() for k, v in names.items()})


def prepare_argv(config: DataConfig, out: Path, overwrite: bool) -> list[str]:
    """`dpolab data prepare` arguments for `config` (options at their default are left out, as a person would)."""
    argv = ["data", "prepare", "--dataset", config.dataset, "--out", str(out)]
    flags = {"split": "--split", "shape": "--shape", "template": "--template", "tokenizer": "--model",
             "max_length": "--max-length", "max_prompt_length": "--max-prompt-length", "test_size": "--test-size",
             "seed": "--seed", "prompt_column": "--prompt-column", "chosen_column": "--chosen-column",
             "rejected_column": "--rejected-column", "completion_column": "--completion-column",
             "label_column": "--label-column", "limit": "--limit"}
    for field, flag in flags.items():
        value = getattr(config, field)
        if value != getattr(DEFAULTS, field):
            argv += [flag, str(value)]
    if config.unpaired:
        argv.append("--unpaired")
    if overwrite:
        argv.append("--overwrite")
    return argv


# ----------------------------------------------------------------------------------------------------------- preview
@st.cache_resource(show_spinner=False, max_entries=4)
def _tokenizer(name: str):
    from dpolab.models import load_tokenizer

    return load_tokenizer(name)


def _stamp(source: str) -> tuple:
    """What the preview of `source` depends on besides the options: its files' names, sizes and times."""
    files = sources.source_files(source)
    return ("hub", source) if files is None else tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files)


@st.cache_data(show_spinner=False, max_entries=16)
def preview(config_json: str, stamp: tuple) -> dict[str, Any]:
    """`build` on the first `limit` rows: report, records (in source order) and dropped rows; or {"error": …}.
    A failure is cached too (a Hub id that cannot be reached is not retried on every rerun; Reload clears it)."""
    config = DataConfig.model_validate_json(config_json)
    try:
        first = next((row.value for row in sources.read_rows(config.dataset, config.split) if row.value), None)
        train, test, report, dropped = build(config, _tokenizer(config.tokenizer))
    except (DpolabError, OSError, ValueError) as exc:
        return {"error": one_line(exc)}
    records = sorted(train + test, key=lambda r: (r["source"], r["line"]))
    return {"report": report, "records": records, "dropped": dropped, "columns": sorted(first or {})}


def show_preview(config: DataConfig, sample: int, shown: int) -> dict[str, Any] | None:
    sampled = config.model_copy(update={"limit": min(config.limit or sample, sample), "strict": False})
    try:
        stamp = _stamp(config.dataset)
    except DpolabError as exc:
        st.error(one_line(exc))
        return None
    with st.spinner("Reading and tokenizing a sample…"):
        result = preview(sampled.model_dump_json(), stamp)
    if "error" in result:
        st.error(result["error"])
        return None
    report, records, dropped = result["report"], result["records"], result["dropped"]
    st.markdown(f"**Shape:** `{report['shape']}` ({report['kind']}) · **columns:** "
                + ", ".join(f"`{c}`" for c in result["columns"]))
    st.caption(f"Preview of the first {report['rows_in']} rows through the same pipeline as Prepare "
               f"(template `{report['template']}`, tokenizer `{report['tokenizer']}`, max length {report['max_length']}).")
    _counts(report)
    st.subheader("Rows as training sees them")
    for record in records[:shown]:
        _show_record(record, report["kind"])
    st.subheader("Dropped rows")
    _drops(report, dropped)
    st.subheader("Token lengths")
    _histograms(records, report["kind"])
    _tokens_table(report, "data_token_stats")
    return result


def _counts(report: dict[str, Any]) -> None:
    cols = st.columns(5)
    for col, (label, key) in zip(cols, (("rows read", "rows_in"), ("kept", "rows_kept"), ("dropped", "rows_dropped"),
                                        ("train", "train"), ("test", "test"))):
        col.metric(label, report[key])


def _exact(text: str) -> None:
    # st.code drops one leading and one trailing newline; padding keeps the text exactly (a chat template's "\n").
    st.code(f"\n{text}\n", language=None, wrap_lines=True)


def _show_record(record: dict[str, Any], kind: str) -> None:
    label = f"{Path(record['source']).name}:{record['line']}"
    if kind == "unpaired":
        label += " · desirable" if record["label"] else " · undesirable"
    with st.container(border=True):
        st.caption(label)
        st.markdown(f"**Prompt** · {len(record['prompt_ids'])} tokens")
        _exact(record["prompt"])
        first, second = ("Completion", "KL completion (another row's)") if kind == "unpaired" else ("Chosen", "Rejected")
        a, b = st.columns(2)
        with a:
            st.markdown(f"**{first}** · {len(record['chosen_ids'])} tokens")
            _exact(record["chosen"])
        with b:
            st.markdown(f"**{second}** · {len(record['rejected_ids'])} tokens")
            _exact(record["rejected"])


def _drops(report: dict[str, Any], dropped: list[dict[str, Any]]) -> None:
    if not report["dropped"]:
        st.success("No row dropped.")
    else:
        st.dataframe(pd.DataFrame({"reason": list(report["dropped"]), "rows": list(report["dropped"].values())}),
                     hide_index=True, key="data_drop_counts")
        for reason in report["dropped"]:
            examples = [d for d in dropped if d["reason"] == reason][:EXAMPLES_PER_REASON]
            with st.expander(f"{reason}: {report['dropped'][reason]} rows"):
                for d in examples:
                    st.markdown(f"`{Path(d['source']).name}:{d['line']}` {d.get('detail') or ''}")
                    if "row" in d:
                        st.code(json.dumps(d["row"], ensure_ascii=False, default=str)[:1000], language="json",
                                wrap_lines=True)
    truncated = report.get("truncated") or {}
    if truncated.get("pairs"):
        st.info(f"{truncated['pairs']} kept rows were truncated to max length {report['max_length']} "
                f"(prompt {truncated.get('prompt', 0)}, chosen {truncated.get('chosen', 0)}, "
                f"rejected {truncated.get('rejected', 0)}).")


def _histograms(records: list[dict[str, Any]], kind: str) -> None:
    names = {"chosen": "completion", "rejected": "KL completion"} if kind == "unpaired" else {}
    for col, key in zip(st.columns(3), ("prompt", "chosen", "rejected")):
        lengths = np.asarray([len(r[f"{key}_ids"]) for r in records])
        counts, edges = np.histogram(lengths, bins=min(BINS, max(1, len(set(lengths.tolist())))))
        frame = pd.DataFrame({"rows": counts}, index=pd.Index(edges[:-1].round().astype(int), name="tokens"))
        with col:
            st.caption(f"{names.get(key, key)} tokens")
            st.bar_chart(frame, x_label="tokens", y_label="rows", height=200)


def _tokens_table(report: dict[str, Any], key: str) -> None:
    rows = [{"": name, **stats} for name, stats in report["tokens"].items() if stats]
    if rows:
        st.dataframe(pd.DataFrame(rows).set_index(""), key=key)


# ----------------------------------------------------------------------------------------------------------- prepare
def show_report(report: dict[str, Any], folder: PreparedFolder) -> None:
    st.success(f"Prepared `{folder.path}`: {report['rows_kept']} of {report['rows_in']} rows kept "
               f"({report['train']} train / {report['test']} test), {report['rows_dropped']} dropped.")
    _counts(report)
    if report["dropped"]:
        st.dataframe(pd.DataFrame({"reason": list(report["dropped"]), "rows": list(report["dropped"].values())}),
                     hide_index=True, key="prepare_drop_counts")
    _tokens_table(report, "prepare_token_stats")
    st.page_link("views/train.py", label="Train on this data", icon=":material/model_training:", query_params={"data": str(folder.path)})


def job_panel(root: Path, out: Path, was_active: bool) -> None:
    """The prepare job writing `out` (any tab's), live; then the prepared folder's report."""
    job = find_job(root, out)
    folder = PreparedFolder(out)
    if job is not None and job.kind == "prepare":
        show_job(job, "prepare_job")
        if was_active and not job.active:
            st.rerun()  # the whole page: stop polling, enable Prepare again
    if (job is None or not job.active) and is_prepared(out) and folder.report_file.is_file():
        show_report(folder.read_report(), folder)


def prepare_section(root: Path, config: DataConfig | None, default_name: str) -> None:
    st.header("Prepare")
    if "prepare_name" not in st.session_state:
        st.session_state["prepare_name"] = default_name or "data"
    a, b = st.columns([3, 1])
    name = a.text_input("Output name", key="prepare_name",
                        help=f"The prepared folder is written to {root}/<name>.").strip()
    overwrite = b.checkbox("Replace if it exists", key="prepare_overwrite",
                           help="Replace an earlier prepared folder of that name (only a prepared folder).")
    if not NAME.fullmatch(name):
        st.error("Output name: use letters, digits, '.', '_' or '-' (one folder name, no '/').")
        return
    out = root / name
    st.caption(f"Output folder: `{out}`")
    problem = None
    if config is None:
        problem = "pick a source first"
    elif out.exists() and any(out.iterdir()) and not is_prepared(out):
        problem = f"{out} exists and is not a prepared folder: choose another name"
    elif is_prepared(out) and not overwrite:
        problem = f"{out} already holds prepared data: tick 'Replace if it exists' or choose another name"
    running = find_job(root, out, active_only=True)
    if config is not None:
        st.code(shlex.join(["dpolab", *prepare_argv(config, out, overwrite)]), language="bash")
    if problem and running is None:
        st.caption(problem)
    if st.button("Prepare", key="prepare_start", type="primary", disabled=bool(problem) or running is not None,
                 help="Runs `dpolab data prepare` in the background: it goes on if you close the tab."):
        try:
            start_job(root, "prepare", out, prepare_argv(config, out, overwrite))
            st.rerun()  # the button drawn above must show the job is running
        except JobError as exc:  # another tab started it a moment ago
            st.error(one_line(exc))
    active = running is not None
    st.fragment(job_panel, run_every=1.0 if active else None)(root, out, active)


def prepared_folders(root: Path) -> None:
    """Every prepared folder directly under the runs root (and those being prepared), newest first."""
    if not root.is_dir():
        return
    jobs = {job.target: job for job in reversed(list_jobs(root)) if job.kind == "prepare"}  # newest wins
    rows = []
    for child in sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
                        key=lambda p: p.stat().st_mtime, reverse=True):
        job = jobs.get(child.resolve())
        folder = PreparedFolder(child)
        if not (is_prepared(child) and folder.report_file.is_file()) and not (job and job.active):
            continue
        report = folder.read_report() if folder.report_file.is_file() else {}
        rows.append({"name": child.name, "status": job.status if job and job.active else "prepared",
                     "source": report.get("source"), "kept": report.get("rows_kept"), "of": report.get("rows_in"),
                     "template": report.get("template"), "tokenizer": report.get("tokenizer")})
    if rows:
        with st.expander(f"Prepared data in this runs root ({len(rows)})"):
            st.dataframe(pd.DataFrame(rows), hide_index=True)


# -------------------------------------------------------------------------------------------------------------- page
def main() -> None:
    root = runs_root()
    st.title("Data")
    st.caption(f"Runs root: `{root}`")
    source, default_name = pick_source(root)
    if source is not None and source != "demo" and is_prepared(source):
        st.info(f"`{source}` is a prepared folder already: nothing to prepare, train on it as it is.")
        show_report(PreparedFolder(Path(source)).read_report(), PreparedFolder(Path(source)))
        source = None
    config = None
    if source is not None:
        try:
            config = options(source)
        except ValueError as exc:
            st.error(one_line(exc))
        if config is not None:
            a, b, c = st.columns([2, 2, 1])
            sample = a.number_input("Preview sample (rows)", min_value=10, max_value=5000, value=200, step=50,
                                    key="data_preview_rows", help="Rows read for the preview (Prepare reads all).")
            shown = b.number_input("Rows shown", min_value=1, max_value=20, value=3, key="data_rows_shown")
            if c.button("Reload", key="data_reload", help="Read the source again (a Hub dataset is cached)."):
                preview.clear()
            if show_preview(config, int(sample), int(shown)) is None:
                config = None  # nothing to prepare from a source that cannot be read
    prepare_section(root, config, default_name)
    prepared_folders(root)


main()
