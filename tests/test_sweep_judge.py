"""`dpolab sweep` with a judge's win rate as its objective: config checks at the edge, and a 2-trial sweep that
records each trial's win rate (from `dpolab eval`'s own run) and keeps the highest as best/."""

import csv
import json

import pytest
import torch
import yaml

from dpolab.config import ConfigError, load_config
from dpolab.errors import ModelNotFound
from dpolab.sweep import SweepConfig, open_study, run_sweep
from tests.conftest import write_jsonl


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    rows = [{"prompt": f"Question {i}: what is {i} plus one?", "chosen": f"It is {i + 1}.",
             "rejected": f"No idea about {i}, go away."} for i in range(20)]
    return write_jsonl(tmp_path_factory.mktemp("sweepjudge") / "pairs.jsonl", rows)


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory, tiny_llama, tokenizer):
    """A tiny random reward model: sequence classification with one output, built from the tiny Llama's config."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    torch.manual_seed(3)
    config = AutoConfig.from_pretrained(tiny_llama, num_labels=1)
    model = AutoModelForSequenceClassification.from_config(config)
    path = tmp_path_factory.mktemp("judge")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _tree(tmp_path, tiny_llama, pairs_file, **kw) -> dict:
    tree = {"sweep_dir": str(tmp_path / "sweep"), "sampler": "grid", "n_trials": 2, "seed": 1,
            # far apart, so that the two trials answer differently: one barely moves, one moves a lot
            "search_space": {"learning_rate": {"type": "categorical", "choices": [1e-5, 5e-2]}},
            "base": {"model": str(tiny_llama), "data": {"dataset": str(pairs_file), "test_size": 0.25},
                     "epochs": 2, "batch_size": 5, "report_to": [], "save_total_limit": 1}}
    tree.update(kw)
    return tree


@pytest.mark.parametrize("change, message", [
    ({"objective": "judge_win_rate"}, "objective judge_win_rate needs a judge"),
    ({"judge": {"model": "x"}}, "judge is only used by the objectives judge_win_rate or judge_lc_win_rate"),
    ({"objective": "judge_win_rate", "judge": {"model": "x", "prompt": 3}}, "prompt"),
    ({"objective": "judge_win_rate", "judge": {"model": "x", "prompts": 0}}, "greater than 0"),
])
def test_judge_objective_is_checked_at_the_edge(tmp_path, tiny_llama, pairs_file, change, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(_tree(tmp_path, tiny_llama, pairs_file, **change)))
    with pytest.raises(ConfigError, match=message):
        load_config(SweepConfig, path)


def test_win_rate_objectives_are_maximized(tmp_path, tiny_llama, pairs_file):
    for objective, direction in (("eval_loss", "minimize"), ("judge_win_rate", "maximize"),
                                 ("judge_lc_win_rate", "maximize")):
        judge = {"model": "x"} if objective.startswith("judge") else None
        cfg = SweepConfig.model_validate(_tree(tmp_path, tiny_llama, pairs_file, objective=objective, judge=judge))
        assert cfg.direction == direction


def test_a_judge_that_cannot_be_loaded_stops_the_sweep_before_training(tmp_path, tiny_llama, pairs_file):
    tree = _tree(tmp_path, tiny_llama, pairs_file, objective="judge_win_rate",
                 judge={"model": str(tmp_path / "missing" / "rm")})
    with pytest.raises(ModelNotFound, match="^--judge "):
        run_sweep(SweepConfig.model_validate(tree), log=lambda m: None)
    assert not (tmp_path / "sweep" / "trials").exists()


def test_two_trial_sweep_selects_by_the_judges_win_rate(tmp_path, tiny_llama, pairs_file, judge_dir):
    from dpolab.sweep.report import trials_table

    tree = _tree(tmp_path, tiny_llama, pairs_file, objective="judge_lc_win_rate",
                 judge={"model": str(judge_dir), "prompts": 4, "max_new_tokens": 8})
    cfg = SweepConfig.model_validate(tree)
    summary = run_sweep(cfg, log=lambda m: None)
    trials = {t.number: t for t in open_study(cfg).get_trials(deepcopy=False)}
    assert len(trials) == 2 and {t.state.name for t in trials.values()} == {"COMPLETE"}
    values = {}
    for number, trial in trials.items():
        # the trial's own `dpolab eval` report (run_eval on its run folder) holds the numbers the study recorded
        verdict = json.loads((cfg.sweep_dir / "trials" / f"{number:03d}" / "eval" / "eval.json").read_text())["judge"]
        assert trial.value == verdict["lc_win_rate"] and trial.user_attrs["judge_win_rate"] == verdict["win_rate"]
        assert verdict["prompts"] == 4 + 2  # test prompts asked for + eval's two fixed prompts
        values[number] = trial.value
    assert values[0] != values[1], "the two trials should be told apart by the judge (else the test proves little)"
    best = max(values, key=values.get)
    saved = json.loads((cfg.sweep_dir / "best.json").read_text())
    assert saved["trial"] == best == summary["best"]["trial"] and saved["objective"] == "judge_lc_win_rate"
    assert saved["value"] == values[best]
    with open(cfg.sweep_dir / "trials.csv") as handle:
        rows = {int(r["trial"]): r for r in csv.DictReader(handle)}
    assert {n: float(r["judge_lc_win_rate"]) for n, r in rows.items()} == pytest.approx(values)
    assert [c.header for c in trials_table(summary, cfg).columns][-4:] == ["win rate", "LC win rate", "seconds", "host"]
