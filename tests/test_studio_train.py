"""The studio's Train page: the form's command is what the CLI parses back to the same config, and the page (AppTest,
no browser) in each state: an empty runs root, a running job (a real `dpolab train` job on a tiny model) stopped
and resumed from the page, a failed job, a finished run."""

from __future__ import annotations

import sys
from pathlib import Path
from urllib.parse import quote

import pytest

st = pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

from dpolab import EMBEDDED_MODEL  # noqa: E402
from dpolab.app import train_form as tf  # noqa: E402
from dpolab.app.common import STUDIO  # noqa: E402
from dpolab.cli.train import config_overrides, eval_schedule  # noqa: E402
from dpolab.errors import ConfigError  # noqa: E402
from dpolab.config import TrainConfig, load_config  # noqa: E402
from dpolab.folders.run import RunFolder  # noqa: E402
from dpolab.jobs import JobError, list_jobs, log_tail, read_job, start_job, stop_job, wait_job  # noqa: E402
from tests.test_jobs import wait_until  # noqa: E402

OTHER = "Other (path or Hub id)…"


# ------------------------------------------------------------------------------------------------ the command
def cli_config(argv: list[str]) -> TrainConfig:
    """What `dpolab train ARGV` runs: parsed by the CLI's own click command, then its overrides and load_config."""
    import typer

    from dpolab.cli import app

    command = typer.main.get_command(app).commands["train"]
    assert argv[0] == "train"
    params = command.make_context("train", list(argv[1:])).params
    assert not params["dry_run"]
    return load_config(TrainConfig, None, config_overrides(params))


CASES = {
    "defaults": {},
    "dpo, everything changed": dict(
        beta=0.25, learning_rate=5e-4, epochs=2.5, max_steps=3, batch_size=4, grad_accum=2, loss_type=["sigmoid", "sft"],
        loss_weights="1,0.5", lora_r=8, precision="fp32", layout="padded", attention="sdpa",
        gradient_checkpointing="off", seed=7, template="chat", max_length=256, ld_alpha="0.3", label_smoothing=0.0,
        model="org/some-model", dataset="/data/pairs.jsonl", ref_model="org/ref", eval_every="5"),
    "simpo (dpo-only options set but hidden)": dict(
        method="simpo", loss_type=["hinge"], ld_alpha="0.5", simpo_gamma=1.0, alphapo_alpha=0.2, cpo_alpha="0.1",
        label_smoothing=0.1, beta=2.0),
    "kto": dict(method="kto", desirable_weight=1.5, undesirable_weight=0.5, gradient_checkpointing="on", eval_every="no"),
    "reward": dict(method="reward", center_rewards_coefficient="0.01", beta=0.5, learning_rate=1e-5),
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_command_parses_back_to_the_forms_config(case, tmp_path):
    values = {**tf.defaults(), **CASES[case]}
    out = tmp_path / "runs" / "x"
    cfg, problems = tf.validate(values, out)
    assert problems == [] and cfg is not None
    argv = tf.build_argv(values, out)
    assert cli_config(argv) == cfg
    config_file = tmp_path / "c.yaml"
    config_file.write_text(tf.to_yaml(values, out))
    assert load_config(TrainConfig, config_file) == cfg  # the YAML preview is the same run
    # Only what differs from the CLI's defaults is in the command.
    flags = [a for a in argv[1:] if a.startswith("--")]
    assert flags[0] == "--output-dir"
    assert len(flags) - 1 == len(tf.changed(values))
    if case == "defaults":
        assert argv == ["train", "--output-dir", str(out)] and cfg == TrainConfig(output_dir=out)
    if case.startswith("simpo"):
        assert "--loss-type" not in argv and "--ld-alpha" not in argv and cfg.method == "simpo"
        assert (cfg.simpo_gamma, cfg.alphapo_alpha, cfg.cpo_alpha, cfg.beta) == (1.0, 0.2, 0.1, 2.0)
    if case == "reward":
        assert "--beta" not in argv and cfg.center_rewards_coefficient == 0.01  # a reward model has no β
    if case.startswith("dpo"):
        assert cfg.lora.r == 8 and cfg.loss_types == ("sigmoid", "sft") and cfg.gradient_checkpointing is False
        assert argv[argv.index("--learning-rate") + 1] == "0.0005" and argv[argv.index("--epochs") + 1] == "2.5"
        assert (cfg.eval_every, cfg.eval_steps, cfg.save_every, cfg.save_steps) == ("steps", 5, "steps", 5)
    if case == "kto":
        assert cfg.eval_every == "no" and "--eval-every" in argv


def test_defaults_and_help_come_from_the_cli_and_the_config():
    import typer

    from dpolab.cli import app

    options = {p.name: p for p in typer.main.get_command(app).commands["train"].params}
    plain = TrainConfig()
    for field in tf.FIELDS:  # the CLI's option: its flag, its help text
        assert field.flag in options[field.option].opts and field.help == options[field.option].help and field.help
    assert tf.defaults()["beta"] == plain.beta and tf.defaults()["max_steps"] == plain.max_steps == -1
    assert tf.defaults()["model"] == plain.model == EMBEDDED_MODEL and tf.defaults()["dataset"] == plain.data.dataset
    assert tf.defaults()["max_length"] == plain.data.max_length and tf.defaults()["lora_r"] == 0 and plain.lora is None
    assert tf.BY_OPTION["method"].choices == ("dpo", "simpo", "cpo", "orpo", "kto", "reward")
    assert "sigmoid" in tf.BY_OPTION["loss_type"].choices and tf.BY_OPTION["precision"].choices[0] == "auto"


def test_validation_names_the_field_on_one_line(tmp_path):
    out = tmp_path / "x"
    _, problems = tf.validate({**tf.defaults(), "beta": 0.0, "batch_size": 0}, out)
    assert problems == ["β (--beta): Input should be greater than 0",
                        "Batch size (--batch-size): Input should be greater than 0"]
    _, problems = tf.validate({**tf.defaults(), "loss_type": ["sigmoid", "sft"], "loss_weights": "1,2,3"}, out)
    assert problems == ["config: 3 loss_weights for 2 loss types (sigmoid, sft): give one weight per loss type"]
    _, problems = tf.validate({**tf.defaults(), "ld_alpha": "lots"}, out)
    assert problems == ["LD-DPO α (--ld-alpha): not a number: 'lots'"]
    _, problems = tf.validate({**tf.defaults(), "loss_type": []}, out)
    assert problems == ["Loss type(s) (--loss-type): choose at least one loss type"]
    _, problems = tf.validate({**tf.defaults(), "max_length": 4}, out)
    assert problems == ["Max length (tokens) (--max-length): Input should be greater than 8"]


def test_eval_every_sets_the_save_schedule_with_it():
    assert eval_schedule(None) == {} and eval_schedule("no") == {"eval_every": "no"}
    assert eval_schedule("Epoch") == {"eval_every": "epoch", "save_every": "epoch"}
    assert eval_schedule("20") == {"eval_every": "steps", "eval_steps": 20, "save_every": "steps", "save_steps": 20}
    for bad in ("0", "steps", "-3", "1.5"):
        with pytest.raises(ConfigError, match="--eval-every must be epoch, no, or a number of steps"):
            eval_schedule(bad)
    _, problems = tf.validate({**tf.defaults(), "eval_every": "often"}, Path("x"))
    assert problems == ["Evaluate every (--eval-every): epoch, no, or a number of steps (got 'often')"]


def test_the_cli_refuses_a_bad_eval_every_on_one_line():
    from typer.testing import CliRunner

    from dpolab.cli import app

    result = CliRunner().invoke(app, ["train", "--eval-every", "often", "--dry-run"])
    assert result.exit_code == 1
    assert result.output.strip() == "error: --eval-every must be epoch, no, or a number of steps (got 'often')"


def test_long_curves_are_thinned_for_drawing_with_every_evaluation_kept():
    history = [{"step": s, "loss": 1 / s} for s in range(1, 5001)] + [{"step": s, "eval_loss": 2 / s}
                                                                       for s in range(500, 5001, 500)]
    points = tf.curves(sorted(history, key=lambda h: h["step"]))["loss"]
    kept = tf.thin(points)
    train = [p for p in kept if not p["eval"]]
    assert 1000 < len(train) <= 1501 and train[0]["step"] == 1 and train[-1]["step"] == 5000
    assert [p["step"] for p in kept if p["eval"]] == list(range(500, 5001, 500))
    assert tf.thin(points[:100]) == points[:100]


def test_resume_argv_drops_overwrite():
    argv = ["train", "--output-dir", "/r/x", "--max-steps", "5", "--overwrite"]
    assert tf.resume_argv(argv) == ["train", "--output-dir", "/r/x", "--max-steps", "5", "--resume"]
    assert tf.resume_argv(tf.resume_argv(argv)).count("--resume") == 1


# ------------------------------------------------------------------------------------------------ the page
@pytest.fixture(scope="module")
def pairs(arithmetic_pairs) -> Path:
    return arithmetic_pairs


@pytest.fixture
def open_train(monkeypatch):
    """A new tab on the Train page of a studio serving `runs`."""

    def make(runs: Path) -> AppTest:
        monkeypatch.setattr(sys, "argv", [str(STUDIO), "--runs-dir", str(runs)])
        at = AppTest.from_file(str(STUDIO), default_timeout=60)
        at.run()
        at.switch_page("views/train.py").run()
        assert not at.exception, at.exception
        return at

    return make


def rerun(at: AppTest) -> AppTest:
    at.run()
    assert not at.exception, at.exception
    return at


def fill(at: AppTest, model: Path, dataset: str, name: str, max_steps: int) -> AppTest:
    """The form set for a tiny run: model and data typed in as paths, fp32, small batches."""
    at.selectbox(key="train_model_choice").set_value(OTHER).run()
    at.text_input(key="train_model").set_value(str(model)).run()
    at.selectbox(key="train_dataset_choice").set_value(OTHER).run()
    at.text_input(key="train_dataset").set_value(dataset).run()
    at.text_input(key="train_output").set_value(name)
    at.number_input(key="train_max_steps").set_value(max_steps)
    at.number_input(key="train_batch_size").set_value(4)
    at.selectbox(key="train_precision").set_value("fp32")
    return rerun(at)


def preview(at: AppTest) -> str:
    return at.code[0].value


def progress_texts(at: AppTest) -> list[str]:
    return [p.proto.text for p in at.get("progress")]


def charts(at: AppTest) -> dict:
    """The page's charts: container key suffix (loss, accuracy, margins, logps) -> the data frame the chart draws."""
    import pyarrow as pa

    found = {}

    def walk(node, key=None):
        proto_id = getattr(getattr(node, "proto", None), "id", "") or ""
        if "-train_chart_" in proto_id:
            key = proto_id.rsplit("-train_chart_", 1)[1]
        if getattr(node, "type", None) == "vega_lite_chart" and key:
            (dataset,) = node.proto.datasets
            found[key] = pa.ipc.open_stream(dataset.data.data).read_all().to_pandas()
        children = getattr(node, "children", None)
        for child in (children.values() if isinstance(children, dict) else ()):
            walk(child, key)

    walk(at._tree[0])
    return found


def series(frame, name: str) -> list[tuple[int, float]]:
    rows = frame[frame["series"] == name].sort_values("step")
    return [(int(s), round(float(v), 6)) for s, v in zip(rows["step"], rows["value"])]


def test_empty_runs_root_shows_the_form_with_the_clis_defaults(open_train, tmp_path):
    runs = tmp_path / "runs"
    at = open_train(runs)
    plain = TrainConfig()
    numbers = {w.key: w.value for w in at.number_input}
    assert numbers["train_beta"] == plain.beta and numbers["train_learning_rate"] == plain.learning_rate
    assert numbers["train_epochs"] == plain.epochs and numbers["train_max_steps"] == -1
    assert numbers["train_batch_size"] == plain.batch_size and numbers["train_lora_r"] == 0
    assert numbers["train_seed"] == plain.seed and numbers["train_max_length"] == plain.data.max_length
    assert at.selectbox(key="train_method").value == "dpo"
    assert at.selectbox(key="train_model_choice").options == [EMBEDDED_MODEL, OTHER]
    assert at.selectbox(key="train_dataset_choice").options == ["demo", OTHER]
    assert at.number_input(key="train_beta").help == tf.BY_OPTION["beta"].help
    assert at.text_input(key="train_output").value == "dpo" and at.text_input(key="train_eval_every").value == "epoch"
    out = runs.resolve() / "dpo"
    assert preview(at) == f"dpolab train --output-dir {out}"
    assert not at.error and not at.button(key="train_start").disabled
    assert any("No training job" in c.value for c in at.caption)

    at.number_input(key="train_max_steps").set_value(2)
    at.multiselect(key="train_loss_type").set_value(["sigmoid", "sft"])
    rerun(at)
    assert preview(at) == f"dpolab train --output-dir {out} --max-steps 2 --loss-type sigmoid,sft"
    assert "max_steps: 2" in at.code[1].value and "- sft" in at.code[1].value

    at.number_input(key="train_beta").set_value(0.0)
    at.text_input(key="train_output").set_value("../elsewhere")
    rerun(at)
    errors = [e.value for e in at.error]
    assert errors == ["Output folder: '../elsewhere' must be a plain folder name (the run is written under the runs "
                      "root)", "β (--beta): Input should be greater than 0"]
    assert at.button(key="train_start").disabled
    at.selectbox(key="train_method").set_value("reward")  # no β for a reward model: the field goes away
    at.text_input(key="train_output").set_value("rm")
    rerun(at)
    assert not at.error and "train_beta" not in {w.key for w in at.number_input}
    assert preview(at) == f"dpolab train --output-dir {runs.resolve() / 'rm'} --method reward --max-steps 2"
    assert list_jobs(runs) == []


def test_a_finished_run_shows_its_metrics_and_refuses_a_second_start(open_train, tmp_path, tiny_llama, pairs):
    runs = tmp_path / "runs"
    at = fill(open_train(runs), tiny_llama, str(pairs), "tiny", 2)
    out = runs.resolve() / "tiny"
    shown = preview(at)
    at.button(key="train_check").click()  # the dry run: validated and planned in the page, no job
    rerun(at)
    plan = {m.label: m.value for m in at.metric}
    assert plan["Total steps"] == "2" and list_jobs(runs) == []
    at.button(key="train_start").click()
    rerun(at)
    (job,) = list_jobs(runs)
    assert job.kind == "train" and job.target == out and job.command == shown  # the job runs what the preview shows
    assert job.argv == ["train", "--output-dir", str(out), "--model", str(tiny_llama), "--dataset", str(pairs),
                        "--max-steps", "2", "--batch-size", "4", "--precision", "fp32"]
    assert at.selectbox(key="train_job_pick").value == job.id
    assert wait_job(job, timeout=240).status == "finished", log_tail(job)
    rerun(at)
    metrics = RunFolder(out).read_metrics()
    shown_metrics = {m.label: m.value for m in at.metric}
    assert shown_metrics["Train loss"] == f"{metrics['train_loss']:.4f}"
    assert shown_metrics["Eval loss (best)"] == f"{metrics['best']['loss']:.4f}"
    assert shown_metrics["Reward accuracy"] == f"{metrics['best']['rewards/accuracies']:.3f}"
    assert shown_metrics["Steps"] == "2"
    assert plan["Training pairs"] == str(RunFolder(out).read_data_report()["train"])  # the plan said what ran
    assert progress_texts(at)[0].startswith("Step 2 of 2")
    assert any(s.value.startswith("Finished in") for s in at.success)
    links = {link.proto.label: (link.proto.page, link.proto.query_string) for link in at.get("page_link")}
    # Runs is the studio's default page without a model: its address is the root ("").
    linked = f"model={quote(str(out), safe='')}"
    assert links == {"Compare it on the Runs page": ("", ""), "Publish it": ("publish", linked),
                     "Chat with it": ("chat", linked)}, links
    # The curves are the run's own progress: train loss per step, the eval point, the log-probs.
    history = RunFolder(out).read_progress().history
    drawn = charts(at)
    assert sorted(drawn) == ["accuracy", "logps", "loss", "margins"]
    assert series(drawn["loss"], "train") == [(h["step"], round(h["loss"], 6)) for h in history if "loss" in h]
    assert series(drawn["loss"], "eval") == [(h["step"], round(h["eval_loss"], 6)) for h in history if "eval_loss" in h]
    assert len(series(drawn["loss"], "train")) == 2 and len(series(drawn["loss"], "eval")) >= 1
    assert series(drawn["logps"], "chosen") == [(h["step"], round(h["logps/chosen"], 6))
                                                for h in history if "logps/chosen" in h]
    # The same form again: the folder holds a finished run; the CLI's own check refuses, overwrite is offered.
    assert at.button(key="train_start").disabled
    assert any("already holds a finished run" in w.value for w in at.warning) and not at.error
    at.checkbox(key="train_overwrite").check()
    rerun(at)
    assert not at.button(key="train_start").disabled and preview(at).endswith("--overwrite")


def test_a_running_job_is_shown_in_every_tab_stopped_and_resumed(open_train, tmp_path, tiny_llama, pairs):
    runs = tmp_path / "runs"
    at = fill(open_train(runs), tiny_llama, str(pairs), "long", 100000)
    at.button(key="train_start").click()
    rerun(at)
    (job,) = list_jobs(runs)
    run = RunFolder(job.target)
    wait_until(lambda: (p := run.read_progress()) and p.step >= 2, timeout=120, what="step 2")
    rerun(at)
    (bar,) = progress_texts(at)
    assert bar.startswith("Step ") and " of 100000" in bar and "ETA" in bar
    assert at.button(key="train_stop") and len(series(charts(at)["loss"], "train")) >= 2

    # A second tab: the running job is shown and selected; the same folder cannot be started again.
    other = fill(open_train(runs), tiny_llama, str(pairs), "long", 100000)
    assert other.selectbox(key="train_job_pick").value == job.id and other.button(key="train_stop")
    assert other.button(key="train_start").disabled
    assert any("already writing this folder" in i.value for i in other.info)
    with pytest.raises(JobError, match="already being written"):
        start_job(runs, "train", job.target, job.argv)  # a click that raced past the check

    at.button(key="train_stop").click()
    rerun(at)
    stopped = wait_job(job, timeout=120)
    assert stopped.status == "stopped", log_tail(stopped)
    rerun(at)
    step = run.read_progress().step
    assert any(i.value.startswith(f"Stopped at step {step} of 100000") for i in at.info)
    assert run.has_checkpoints() and not run.is_finished()
    at.button(key="train_resume").click()
    rerun(at)
    resumed = list_jobs(runs)[0]
    assert resumed.id != job.id and resumed.argv == [*job.argv, "--resume"]
    assert at.selectbox(key="train_job_pick").value == resumed.id
    wait_until(lambda: (p := run.read_progress()) and p.step > step, timeout=120, what="a step after the resume")
    stop_job(read_job(resumed.folder))
    assert wait_job(resumed, timeout=120).status == "stopped", log_tail(resumed)
    losses = [p["step"] for p in run.read_progress().history if "loss" in p]
    assert losses == list(range(1, len(losses) + 1)) and len(losses) > step  # the resumed run went on from there
    rerun(other)  # the other tab follows the run to the newer job: stopped too, with Resume
    assert other.selectbox(key="train_job_pick").value == resumed.id and other.button(key="train_resume")


def test_a_failed_job_shows_its_error_line(open_train, tmp_path, tiny_llama):
    runs = tmp_path / "runs"
    missing = tmp_path / "no-such-data.jsonl"
    at = fill(open_train(runs), tiny_llama, str(missing), "bad", 2)
    assert any("read as a Hugging Face Hub dataset id" in c.value for c in at.caption)
    at.button(key="train_start").click()
    rerun(at)
    (job,) = list_jobs(runs)
    done = wait_job(job, timeout=120)
    assert done.status == "failed"
    rerun(at)
    (failure,) = at.error
    assert failure.value.startswith("Failed: ") and "no-such-data" in failure.value
    assert "\n" not in failure.value
    assert not [b for b in at.button if b.key in ("train_stop", "train_resume")]
    assert at.selectbox(key="train_job_pick").format_func(job.id).startswith("bad · failed")


def test_the_data_pages_link_preselects_its_prepared_folder(monkeypatch, tmp_path, tiny_llama, pairs, tokenizer):
    """"Train on this data" on the Data page opens Train with ?data=FOLDER: that folder is the chosen dataset."""
    from dpolab.config import DataConfig
    from dpolab.data.prepare import prepare_data

    runs = tmp_path / "runs"
    for name in ("older", "mine"):
        prepare_data(DataConfig(dataset=str(pairs), tokenizer=str(tiny_llama)), runs / name, tokenizer=tokenizer)
    monkeypatch.setattr(sys, "argv", [str(STUDIO), "--runs-dir", str(runs)])
    at = AppTest.from_file(str(STUDIO), default_timeout=60)
    at.query_params["data"] = str((runs / "older").resolve())
    at.run()
    at.switch_page("views/train.py").run()
    assert not at.exception, at.exception
    assert at.selectbox(key="train_dataset_choice").value == str((runs / "older").resolve())
    assert f"--dataset {(runs / 'older').resolve()}" in preview(at)
