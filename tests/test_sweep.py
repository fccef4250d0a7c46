"""`dpolab sweep`: trial folders, best/, resume after SIGKILL, two workers on one study, one reference pass."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from dpolab.config import ConfigError, load_config
from dpolab.sweep import SweepConfig, open_study, run_sweep
from tests.conftest import write_jsonl

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    rows = [{"prompt": f"Question {i}: what is {i} plus one?", "chosen": f"It is {i + 1}.",
             "rejected": f"No idea about {i}, go away."} for i in range(20)]
    return write_jsonl(tmp_path_factory.mktemp("sweepdata") / "pairs.jsonl", rows)


def _sweep(tmp_path, tiny_llama, pairs_file, **kw) -> dict:
    tree = {"sweep_dir": str(tmp_path / "sweep"), "sampler": "random", "n_trials": 4, "seed": 1, "pruner": "none",
            "search_space": {"learning_rate": {"type": "float", "low": 1e-4, "high": 3e-3, "log": True},
                             "beta": {"type": "categorical", "choices": [0.05, 0.1, 0.5]}},
            "base": {"model": str(tiny_llama), "data": {"dataset": str(pairs_file), "test_size": 0.25},
                     "epochs": 2, "batch_size": 5, "report_to": [], "save_total_limit": 1}}
    tree.update(kw)
    return tree


@pytest.mark.parametrize("sampler", ["random", "grid"])
def test_four_trial_sweep_selects_lowest_eval_loss(tmp_path, tiny_llama, pairs_file, sampler):
    from transformers import AutoModelForCausalLM

    tree = _sweep(tmp_path, tiny_llama, pairs_file, sampler=sampler)
    if sampler == "grid":  # 2 x 2 points: the sampler's end-of-grid signal must not break the ask/tell loop
        tree["search_space"] = {"learning_rate": {"type": "categorical", "choices": [1e-4, 2e-3]},
                                "beta": {"type": "categorical", "choices": [0.1, 0.5]}}
    cfg = SweepConfig.model_validate(tree)
    summary = run_sweep(cfg, log=lambda m: None)
    sweep_dir = cfg.sweep_dir
    trials = sorted((sweep_dir / "trials").iterdir())
    assert [t.name for t in trials] == ["000", "001", "002", "003"]
    losses = {}
    for t in trials:
        metrics = json.loads((t / "metrics.json").read_text())
        assert (t / "config.yaml").is_file() and (t / "model" / "model.safetensors").is_file()
        losses[int(t.name)] = metrics["best"]["loss"]
    with open(sweep_dir / "trials.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4 and {r["state"] for r in rows} == {"COMPLETE"}
    assert {int(r["trial"]): float(r["eval_loss"]) for r in rows} == pytest.approx(losses)
    best_trial = min(losses, key=losses.get)
    best = json.loads((sweep_dir / "best.json").read_text())
    assert best["trial"] == best_trial == summary["best"]["trial"] and best["value"] == pytest.approx(losses[best_trial])
    assert (sweep_dir / "best" / "model" / "model.safetensors").read_bytes() == \
        (sweep_dir / "trials" / f"{best_trial:03d}" / "model" / "model.safetensors").read_bytes()
    AutoModelForCausalLM.from_pretrained(sweep_dir / "best" / "model")
    assert (sweep_dir / "sweep.png").stat().st_size > 1000
    # The reference forward ran once for the whole sweep: the first trial computed every pair, the others none.
    computed = [json.loads((t / "metrics.json").read_text())["reference_pairs_computed"] for t in trials]
    assert computed[0] == 20 and computed[1:] == [0, 0, 0]


def _launch(config_path: Path, slow: bool = False) -> subprocess.Popen:
    code = ("import sys, time; from transformers import TrainerCallback\n"
            "class Slow(TrainerCallback):\n"
            "    def on_step_end(self, *a, **k): time.sleep(0.5)\n"
            "import dpolab.engine.train as t\n"
            "real = t.run_training\n"
            "t.run_training = lambda cfg, **kw: real(cfg, **{**kw, 'callbacks': [*kw.get('callbacks', []), Slow()]})\n"
            "from dpolab.cli import main\n"
            f"sys.argv = ['dpolab', 'sweep', '-c', {str(config_path)!r}]\n"
            "main()\n") if slow else None
    cmd = [sys.executable, "-c", code] if slow else [sys.executable, "-m", "dpolab", "sweep", "-c", str(config_path)]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _states(cfg: SweepConfig) -> list[tuple[int, str]]:
    return [(t.number, t.state.name) for t in open_study(cfg).get_trials(deepcopy=False)]


def test_sigkill_mid_trial_then_rerun_finishes_without_loss_or_repeat(tmp_path, tiny_llama, pairs_file):
    tree = _sweep(tmp_path, tiny_llama, pairs_file, n_trials=3)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(tree))
    cfg = SweepConfig.model_validate(tree)
    proc = _launch(path, slow=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (cfg.sweep_dir / "trials" / "001" / "checkpoints").is_dir():
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = _states(cfg)
    assert (0, "COMPLETE") in before and (1, "RUNNING") in before
    first_value = json.loads((cfg.sweep_dir / "trials" / "000" / "metrics.json").read_text())["best"]["loss"]
    rerun = subprocess.run([sys.executable, "-m", "dpolab", "sweep", "-c", str(path)], cwd=REPO, capture_output=True,
                           text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
    assert "stale trials [1]" in rerun.stderr + rerun.stdout
    study = open_study(cfg)
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    assert len(complete) == 3
    assert study.trials[1].state.name == "FAIL"
    retry = [t for t in complete if t.user_attrs.get("retry_of") == 1]
    assert len(retry) == 1 and retry[0].params == study.trials[1].params  # retried once, same parameters
    assert study.trials[0].value == pytest.approx(first_value)  # the finished trial was kept, not rerun
    assert len({t.number for t in complete}) == 3 and len({tuple(sorted(t.params.items())) for t in complete}) == 3


def test_two_workers_share_one_study_without_running_a_trial_twice(tmp_path, tiny_llama, pairs_file):
    tree = _sweep(tmp_path, tiny_llama, pairs_file, n_trials=4)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(tree))
    workers = [_launch(path), _launch(path)]
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    assert all(w.returncode == 0 for w in workers), outputs
    cfg = SweepConfig.model_validate(tree)
    trials = open_study(cfg).get_trials(deepcopy=False)
    finished = [t for t in trials if t.state.name == "COMPLETE"]
    assert len(finished) >= 4 and all(t.state.name == "COMPLETE" for t in trials)
    started = [line for out in outputs for line in out.splitlines() if line.startswith("trial ") and "starting" in line]
    numbers = [int(line.split()[1].rstrip(":")) for line in started]
    assert sorted(numbers) == sorted(t.number for t in trials) and len(numbers) == len(set(numbers))
    assert len({t.user_attrs["pid"] for t in trials}) == 2  # both workers took trials
    computed = [json.loads((cfg.sweep_dir / "trials" / f"{t.number:03d}" / "metrics.json").read_text())
                ["reference_pairs_computed"] for t in trials]
    assert sum(computed) == 20  # one reference pass for the whole sweep, even with two workers


@pytest.mark.parametrize("change,message", [
    ({"search_space": {"learning_rate": {"type": "float", "low": 1e-3, "high": 1e-3}}}, "empty range"),
    ({"search_space": {"learning_rat": {"type": "float", "low": 1e-4, "high": 1e-3}}}, "unknown training option 'learning_rat'"),
    ({"sampler": "grid", "n_trials": 2, "search_space": {"beta": {"type": "categorical", "choices": [0.1, 0.2, 0.3]}}},
     "grid of 3 points is too large for n_trials=2"),
    ({"search_space": {}}, "search_space is empty"),
])
def test_bad_search_space_fails_before_training(tmp_path, tiny_llama, pairs_file, change, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(_sweep(tmp_path, tiny_llama, pairs_file, **change)))
    with pytest.raises(ConfigError, match=message):
        load_config(SweepConfig, path)
    assert not (tmp_path / "sweep").exists()


@pytest.mark.parametrize("config", ["configs/sweep-demo.yaml", "configs/sweep-seed.yaml"])
def test_shipped_sweep_configs_validate(config):
    cfg = load_config(SweepConfig, REPO / config)
    assert cfg.n_trials >= 3


def test_pruning_callback_stops_early_but_never_after_the_last_epoch():
    import optuna
    from transformers import TrainerState

    from dpolab.sweep import _Pruning

    class Trial:
        def __init__(self):
            self.reported = []

        def report(self, value, step):
            self.reported.append((step, value))

        def should_prune(self):
            return True

    trial = Trial()
    callback = _Pruning(trial, "eval_loss")
    state = TrainerState(epoch=1.0, global_step=10, max_steps=30)
    with pytest.raises(optuna.TrialPruned):
        callback.on_evaluate(None, state, None, metrics={"eval_loss": 0.9})
    state = TrainerState(epoch=3.0, global_step=30, max_steps=30)
    callback.on_evaluate(None, state, None, metrics={"eval_loss": 0.8})  # the final evaluation completes the trial
    assert trial.reported == [(1, 0.9), (3, 0.8)]


def test_each_trial_trains_on_two_processes_under_torchrun(tmp_path, tiny_llama, pairs_file):
    tree = _sweep(tmp_path, tiny_llama, pairs_file, n_trials=2)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(tree))
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "dpolab", "sweep", "-c", str(path)], cwd=REPO, capture_output=True, text=True,
                         timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    cfg = SweepConfig.model_validate(tree)
    trials = open_study(cfg).get_trials(deepcopy=False)
    assert [(t.number, t.state.name) for t in trials] == [(0, "COMPLETE"), (1, "COMPLETE")]  # rank 1 asked nothing
    assert sorted(p.name for p in (cfg.sweep_dir / "trials").iterdir()) == ["000", "001"]
    for t in trials:
        state = json.loads((cfg.sweep_dir / "trials" / f"{t.number:03d}" / "trainer_state.json").read_text())
        assert state["global_step"] == 4  # 15 train pairs, 5 per process x 2 processes -> 2 steps per epoch, 2 epochs
    assert (cfg.sweep_dir / "best" / "model" / "model.safetensors").is_file()
    assert (run.stdout + run.stderr).count("starting on 2 processes") == 2  # logged by rank 0 only
