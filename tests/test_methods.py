"""Every method end to end: config edge checks, a short run that writes a complete run folder, eval on it; the
reference-free methods never enter the reference pass; KTO refuses data it cannot train on."""

import json

import pytest

from dpolab.config import ConfigError, DataConfig, TrainConfig, load_config
from dpolab.data.prepare import prepare_data
from dpolab.engine.train import run_training
from tests.conftest import write_jsonl

METHODS = {"dpo": {"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]},
           "simpo": {"simpo_gamma": 0.5}, "cpo": {}, "orpo": {}, "kto": {"desirable_weight": 1.2}}


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tokenizer, tiny_llama):
    rows = [{"prompt": f"Question {i}: what is {i} plus {i}?", "chosen": f"It is {2 * i}.",
             "rejected": f"Maybe {i * 3 + 1}, who cares."} for i in range(24)]
    src = write_jsonl(tmp_path_factory.mktemp("src") / "pairs.jsonl", rows)
    base = tmp_path_factory.mktemp("prepared")
    paired, unpaired = base / "paired", base / "unpaired"
    common = dict(dataset=str(src), tokenizer=str(tiny_llama), test_size=0.25)
    prepare_data(DataConfig(**common), paired, tokenizer=tokenizer)
    prepare_data(DataConfig(**common, unpaired=True), unpaired, tokenizer=tokenizer)
    return {"paired": paired, "unpaired": unpaired}


def _cfg(tiny_llama, data, out, method, **kw):
    return TrainConfig(output_dir=out, model=str(tiny_llama), data=DataConfig(dataset=str(data)), method=method,
                       max_steps=2, batch_size=4, learning_rate=1e-3, report_to=[], eval_every="epoch",
                       save_every="epoch", **{**METHODS[method], **kw})


@pytest.mark.parametrize("method", sorted(METHODS))
def test_each_method_trains_and_evaluates(method, folders, tiny_llama, tmp_path, monkeypatch):
    from dpolab.engine import refcache
    from dpolab.engine.methods import REFERENCE_FREE
    from dpolab.evaluate.run import EvalOptions, run_eval

    if method in REFERENCE_FREE:
        def never(*args, **kwargs):
            raise AssertionError("a reference-free method entered the reference pass")

        monkeypatch.setattr(refcache, "ensure_reference", never)
        monkeypatch.setattr(refcache, "compute_logps", never)
    data = folders["unpaired" if method == "kto" else "paired"]
    result = run_training(_cfg(tiny_llama, data, tmp_path / "run", method))
    assert result.metrics["method"] == method and result.metrics["global_step"] == 2
    if method in REFERENCE_FREE:
        assert result.ref_pairs_computed == 0
    else:
        assert list((data / "refcache").glob("*.json")), "the reference pass cached nothing"
    meta = json.loads((tmp_path / "run" / "model" / "dpolab.json").read_text())
    assert meta["method"] == method and (meta["reference_model"] is None) == (method in REFERENCE_FREE)
    best = result.metrics["best"]
    assert best["loss"] == best["loss"] and "rewards/chosen" in best  # a number, not NaN
    monkeypatch.undo()
    evaluation = run_eval(EvalOptions(target=str(tmp_path / "run"), n_prompts=1, max_new_tokens=4,
                                      out=tmp_path / "eval"))
    assert evaluation["method"] == method and 0.0 <= evaluation["metrics"]["policy"]["accuracy"] <= 1.0
    assert f"method <code>{method}</code>" in (tmp_path / "eval" / "report.html").read_text()


def test_kto_refuses_paired_data_and_one_sided_labels(folders, tiny_llama, tmp_path, tokenizer):
    with pytest.raises(ConfigError, match="data prepare --unpaired"):
        run_training(_cfg(tiny_llama, folders["paired"], tmp_path / "a", "kto"))
    with pytest.raises(ConfigError, match="train it with --method kto"):
        run_training(_cfg(tiny_llama, folders["unpaired"], tmp_path / "b", "dpo"))
    rows = [{"prompt": f"Q{i}?", "completion": f"A{i}.", "label": True} for i in range(8)]
    only_good = tmp_path / "good"
    prepare_data(DataConfig(dataset=str(write_jsonl(tmp_path / "good.jsonl", rows)), tokenizer=str(tiny_llama)),
                 only_good, tokenizer=tokenizer)
    from dpolab.errors import DataError

    with pytest.raises(DataError, match="only desirable rows"):
        run_training(_cfg(tiny_llama, only_good, tmp_path / "c", "kto"))


@pytest.mark.parametrize("overrides,message", [
    ({"method": "simpo", "loss_type": "ipo"}, "choose among DPO losses"),
    ({"method": "orpo", "ref_model": "x"}, "reference-free"),
    ({"loss_type": "exo_pair"}, "needs label_smoothing"),
    ({"loss_type": "sigmoid,ipo", "loss_weights": "1"}, "1 loss_weights for 2 loss types"),
    ({"label_smoothing": 0.1}, "label_smoothing applies"),
    ({"method": "kto", "cpo_alpha": 1.0}, "cpo_alpha applies"),
    ({"method": "cpo", "alphapo_alpha": 0.25}, "alphapo_alpha applies"),
    ({"method": "nope"}, "method"),
])
def test_impossible_combinations_are_refused_at_the_edge(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TrainConfig, None, overrides)


def test_sweeps_search_over_methods_and_loss_types(tmp_path):
    from dpolab.sweep import SweepConfig, trial_config

    sweep = SweepConfig(sweep_dir=tmp_path / "s", search_space={
        "method": {"type": "categorical", "choices": ["dpo", "simpo"]},
        "beta": {"type": "float", "low": 0.05, "high": 0.5, "log": True}})
    cfg = trial_config(sweep, {"method": "simpo", "beta": 0.2}, 0, tmp_path / "data")
    assert (cfg.method, cfg.beta, cfg.nll_weight) == ("simpo", 0.2, 0.0)
    grid = SweepConfig(sweep_dir=tmp_path / "g", sampler="grid", n_trials=3,
                       search_space={"loss_type": {"type": "categorical", "choices": ["sigmoid", "ipo", "apo_zero"]}})
    assert trial_config(grid, {"loss_type": "apo_zero"}, 1, tmp_path / "data").loss_types == ("apo_zero",)


@pytest.mark.slow
@pytest.mark.timeout(2400)  # five real-model runs, evals and exports: minutes on a loaded 2-core machine
def test_every_method_on_real_hh_pairs_with_the_embedded_model(hh_path, tmp_path, tokenizer, embedded_dir, monkeypatch):
    """2 steps per method on the shared HH pairs: the run folder is complete, and eval, export and the app take it."""
    import shutil
    import sys

    from streamlit.testing.v1 import AppTest

    from dpolab import EMBEDDED_MODEL
    from dpolab.app.launch import PAGE
    from dpolab.cli.webapp import check_loadable
    from dpolab.evaluate.run import EvalOptions, run_eval
    from dpolab.publish import export_model

    common = dict(dataset=str(hh_path), template="raw", max_length=256, limit=40, test_size=0.1)
    paired, unpaired = tmp_path / "hh", tmp_path / "hh-unpaired"
    prepare_data(DataConfig(**common), paired, tokenizer=tokenizer)
    prepare_data(DataConfig(**common, unpaired=True), unpaired, tokenizer=tokenizer)
    for method in sorted(METHODS):
        run = tmp_path / method
        cfg = TrainConfig(output_dir=run, model=EMBEDDED_MODEL, method=method, max_steps=2, batch_size=4,
                          learning_rate=1e-5, report_to=[], data=DataConfig(dataset=str(unpaired if method == "kto" else paired)),
                          **METHODS[method])
        result = run_training(cfg)
        for name in ("config.yaml", "data_report.json", "metrics.json", "trainer_state.json", "model/model.safetensors"):
            assert (run / name).is_file(), (method, name)
        assert result.metrics["best"]["loss"] == result.metrics["best"]["loss"], method
        evaluation = run_eval(EvalOptions(target=str(run), n_prompts=1, max_new_tokens=4))
        assert evaluation["method"] == method and (run / "eval" / "report.html").is_file()
        exported = export_model(run, tmp_path / f"export-{method}")
        assert method in (exported / "README.md").read_text().split("---")[1]  # the card's tags
        check_loadable(str(run))
        monkeypatch.setattr(sys, "argv", [str(PAGE), str(run)])
        page = AppTest.from_file(str(PAGE), default_timeout=120)
        page.run()
        assert not page.exception, (method, page.exception)
        assert any(f"`{method}`" in md.value for md in page.sidebar.markdown), method
        shutil.rmtree(run)  # ~2.6 GB with its checkpoint and export: five of them do not fit a small CI disk
        shutil.rmtree(exported)
