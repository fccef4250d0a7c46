"""`dpolab eval` on a tiny run: each metric against a direct computation, ties, report contents, determinism, errors."""

import json
import math
import shutil

import pytest
import torch

from dpolab.config import DataConfig, TrainConfig
from dpolab.data.prepare import prepare_data
from dpolab.engine.train import run_training
from dpolab.evaluate.metrics import preference_metrics, win_rate, wilson_interval
from dpolab.errors import ModelNotFound
from dpolab.evaluate.run import EvalError, EvalOptions, run_eval
from tests.conftest import write_jsonl


def test_preference_metrics_hand_computed_with_ties():
    # rewards (β=0.5): chosen 0.5*(−1−(−2))=0.5, rejected 0.5*(−3−(−2))=−0.5 → margin 1; second pair a tie (0 vs 0).
    m = preference_metrics([-1.0, -4.0], [-3.0, -5.0], [-2.0, -4.0], [-2.0, -5.0], beta=0.5)
    assert m["accuracy"] == pytest.approx((1 + 0.5) / 2)
    assert m["margin_mean"] == pytest.approx(0.5) and m["margin_median"] == pytest.approx(0.5)
    assert m["reference_ranking_accuracy"] == pytest.approx((0.5 + 1) / 2)  # −2 vs −2 tie, −4 > −5
    assert m["policy_ranking_accuracy"] == pytest.approx(1.0)
    assert m["chosen_reward_mean"] == pytest.approx(0.25) and m["rejected_reward_mean"] == pytest.approx(-0.25)


def test_win_rate_and_interval():
    result = win_rate([1.0, 2.0, 0.0, 5.0], [0.0, 2.0, 1.0, 1.0])
    assert result["win_rate"] == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    low, high = wilson_interval(2.5, 4)
    assert (result["ci_low"], result["ci_high"]) == pytest.approx((low, high))
    assert low < 0.625 < high and 0 <= low and high <= 1
    assert math.isnan(win_rate([], [])["win_rate"])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_llama, tokenizer):
    work = tmp_path_factory.mktemp("eval")
    # chosen longer than rejected: the random reference prefers the shorter rejected answers by log-prob
    rows = [{"prompt": f"Question {i}: what is {i} plus one?", "chosen": f"It is {i + 1}, since {i} and one more make {i + 1}.",
             "rejected": "No."} for i in range(24)]
    src = write_jsonl(work / "pairs.jsonl", rows)
    prepare_data(DataConfig(dataset=str(src), tokenizer=str(tiny_llama), test_size=0.25), work / "data", tokenizer=tokenizer)
    cfg = TrainConfig(output_dir=work / "run", model=str(tiny_llama), data=DataConfig(dataset=str(work / "data")),
                      epochs=2, batch_size=6, learning_rate=1e-3, report_to=[])
    run_training(cfg)
    return work


def _independent_logps(model_dir, records):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    out = []
    with torch.no_grad():
        for side in ("chosen_ids", "rejected_ids"):
            values = []
            for r in records:
                ids = torch.tensor([r["prompt_ids"] + r[side]])
                logp = model(ids).logits[0, len(r["prompt_ids"]) - 1 : -1].log_softmax(-1)
                values.append(logp.gather(-1, torch.tensor(r[side])[:, None]).sum().item())
            out.append(values)
    return out


def test_eval_metrics_match_direct_computation_and_report(tiny_run, tiny_llama):
    from dpolab.data.prepare import load_prepared

    result = run_eval(EvalOptions(target=str(tiny_run / "run"), n_prompts=2, max_new_tokens=8))
    records = load_prepared(tiny_run / "data").split("test")
    pc, pr = _independent_logps(tiny_run / "run" / "model", records)
    rc, rr = _independent_logps(tiny_llama, records)
    expected = preference_metrics(pc, pr, rc, rr, beta=0.1)
    got = result["metrics"]["policy"]
    for key in expected:
        assert got[key] == pytest.approx(expected[key], abs=1e-4), key
    assert got["pairs"] == 6 and result["reference"] == str(tiny_llama)
    assert got["accuracy"] > got["reference_ranking_accuracy"]  # the tiny run learned the preference
    assert len(result["generations"]) == 4  # 2 sampled + the study's two prompts
    assert {g["question"] for g in result["generations"]} >= {"What is the purpose of life?", "How to live a healthy life?"}
    out = tiny_run / "run" / "eval"
    saved = json.loads((out / "eval.json").read_text())
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    for text in (md, page):
        assert f"{saved['metrics']['policy']['accuracy']:.4f}" in text
        assert f"{saved['metrics']['policy']['margin_mean']:.4f}" in text
        policy = saved["metrics"]["policy"]
        for key in ("accuracy", "reference_ranking_accuracy", "policy_ranking_accuracy"):  # each rate: CI and n
            low, high = wilson_interval(policy[key] * 6, 6)
            assert f"{policy[key]:.4f} (95% CI {low:.3f}–{high:.3f}, n=6)" in text, key
        assert "What is the purpose of life?" in text
    assert page.count("data:image/png;base64,") == 2 and "<img" in page  # curves + margins, inlined
    assert (out / "curves.png").stat().st_size > 1000
    from rich.console import Console

    from dpolab.evaluate.summary import eval_table

    console = Console(width=200, record=True)
    console.print(eval_table(result))
    low, high = wilson_interval(got["accuracy"] * 6, 6)
    assert f"{got['accuracy']:.4f} (95% CI {low:.3f}–{high:.3f}, n=6)" in console.export_text()


def test_eval_is_deterministic(tiny_run, tmp_path):
    a = run_eval(EvalOptions(target=str(tiny_run / "run"), n_prompts=2, max_new_tokens=8, out=tmp_path / "a"))
    b = run_eval(EvalOptions(target=str(tiny_run / "run"), n_prompts=2, max_new_tokens=8, out=tmp_path / "b"))
    a.pop("seconds"), b.pop("seconds")
    assert a == b


def _seq_cls(tiny_llama, tokenizer, path, num_labels=1, seed=1):
    """A tiny random reward model (sequence classification) sharing the tiny Llama's config."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(seed)
    config = LlamaConfig.from_pretrained(tiny_llama)
    config.num_labels = num_labels
    judge = LlamaForSequenceClassification(config)
    judge.config.pad_token_id = tokenizer.pad_token_id
    judge.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_judge_win_rate(tiny_run, tiny_llama, tokenizer, tmp_path):
    from dpolab.evaluate.metrics import length_controlled_win_rate, preferences

    judge = _seq_cls(tiny_llama, tokenizer, tmp_path / "judge")
    result = run_eval(EvalOptions(target=str(tiny_run / "run"), n_prompts=1, max_new_tokens=6, judge=str(judge),
                                  out=tmp_path / "out"))
    gens, j = result["generations"], result["judge"]
    tuned, base = [g["judge_tuned"] for g in gens], [g["judge_base"] for g in gens]
    expected = win_rate(tuned, base)
    assert j["win_rate"] == expected["win_rate"] and j["prompts"] == 3
    assert (j["ci_low"], j["ci_high"]) == pytest.approx(wilson_interval(expected["win_rate"] * 3, 3))
    diffs = [g["tuned_tokens"] - g["base_tokens"] for g in gens]
    assert j["mean_length_change"] == pytest.approx(sum(diffs) / 3)
    lc = length_controlled_win_rate(preferences(tuned, base), diffs)
    assert (j["lc_win_rate"], j["lc_ci_low"], j["lc_ci_high"]) == pytest.approx(
        (lc["lc_win_rate"], lc["lc_ci_low"], lc["lc_ci_high"]))
    assert j["scores"]["tuned"]["max"] == max(tuned) and j["scores"]["base"]["min"] == min(base)
    saved = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert saved["judge"]["lc_win_rate"] == j["lc_win_rate"] and saved["judge"]["win_rate"] == j["win_rate"]
    page, md = (tmp_path / "out" / "report.html").read_text(), (tmp_path / "out" / "report.md").read_text()
    for text in (page, md):
        assert "Judge win rate" in text and "Length-controlled win rate" in text and "Mean length change" in text
        assert f"{j['lc_win_rate']:.3f} (95% CI {j['lc_ci_low']:.3f}–{j['lc_ci_high']:.3f}, n=3)" in text
        assert f"{j['scores']['tuned']['median']:.3f}" in text  # the score quantile table
    assert page.count("data:image/png;base64,") == 3  # curves, margins, judge scores


def _reward_run(tiny_llama, tokenizer, path):
    """A folder laid out as `dpolab train --method reward` leaves it: config, model/ (seq-cls) with its dpolab.json."""
    from dpolab.folders.run import RunFolder

    run = RunFolder(path)
    run.create(overwrite=False)
    run.config_file.write_text(f"model: {tiny_llama}\nmethod: reward\n")
    _seq_cls(tiny_llama, tokenizer, run.model_dir)
    run.write_model_meta({"method": "reward", "template": "qa", "base_model": str(tiny_llama)})
    return run


def test_a_reward_run_folder_is_a_judge_scoring_what_it_was_trained_on(tiny_llama, tokenizer, tmp_path):
    from dpolab.evaluate.run import judge_score, load_judge
    from dpolab.generation import build_prompt

    run = _reward_run(tiny_llama, tokenizer, tmp_path / "rm")
    judge = load_judge(str(run.path))
    assert judge.template == "qa" and judge.model.config.num_labels == 1
    assert load_judge(str(run.model_dir)).template == "qa"  # its model/ alone still says how it was trained
    ids = (tokenizer(build_prompt("Why?", "qa", tokenizer)).input_ids
           + tokenizer("Because.", add_special_tokens=False).input_ids + [tokenizer.eos_token_id])
    with torch.no_grad():
        # pad = EOS here, so transformers pools at the last token before EOS: compute that by hand
        hidden = judge.model.model(input_ids=torch.tensor([ids])).last_hidden_state[0]
        by_hand = judge.model.score(hidden[len(ids) - 2]).item()
    assert judge_score(judge, "Why?", "Because.") == pytest.approx(by_hand, abs=1e-5)


def test_bad_inputs_name_the_problem(tiny_run, tiny_llama, tokenizer, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_run / "run" / "model", broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(ModelNotFound, match="missing model.safetensors"):
        run_eval(EvalOptions(target=str(broken), reference=str(tiny_llama), data=str(tiny_run / "data")))
    src = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a?", "chosen": "b.", "rejected": "c."}])
    prepare_data(DataConfig(dataset=str(src), tokenizer=str(tiny_llama), test_size=0.0), tmp_path / "notest", tokenizer=tokenizer)
    with pytest.raises(EvalError, match="no test split"):
        run_eval(EvalOptions(target=str(tiny_run / "run"), data=str(tmp_path / "notest")))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(EvalError, match="holds no prompts"):
        run_eval(EvalOptions(target=str(tiny_run / "run"), prompts=empty))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": 3}\n')
    with pytest.raises(EvalError, match=r"bad\.jsonl:2: expected an object"):
        run_eval(EvalOptions(target=str(tiny_run / "run"), prompts=bad))
    with pytest.raises(EvalError, match="pass --data"):
        run_eval(EvalOptions(target=str(tiny_run / "run" / "model"), reference=str(tiny_llama)))


def test_a_judge_that_cannot_be_loaded_fails_before_any_generation(tiny_run, tiny_llama, tokenizer, tmp_path,
                                                                    monkeypatch):
    import dpolab.evaluate.run as eval_run

    def no_generation(*args, **kwargs):
        raise AssertionError("generated before the judge was checked")

    monkeypatch.setattr(eval_run, "generate_text", no_generation)
    not_a_judge = tmp_path / "not-a-judge"
    not_a_judge.mkdir()
    with pytest.raises((EvalError, ModelNotFound)):
        run_eval(EvalOptions(target=str(tiny_run / "run"), judge=str(not_a_judge), out=tmp_path / "o"))
    with pytest.raises(ModelNotFound, match="^--judge .*: no such run or model folder"):
        run_eval(EvalOptions(target=str(tiny_run / "run"), judge=str(tmp_path / "missing" / "judge")))
    run = str(tiny_run / "run")  # a DPO run is not a judge, even though its model/ would load with a random head
    with pytest.raises(EvalError, match=rf"^--judge {run}: .*run is a dpolab dpo run, not a reward model"):
        run_eval(EvalOptions(target=run, judge=run, out=tmp_path / "o"))
    with pytest.raises(EvalError, match=r"holds LlamaForCausalLM, not a sequence-classification reward model"):
        run_eval(EvalOptions(target=run, judge=str(tiny_llama), out=tmp_path / "o"))
    two = _seq_cls(tiny_llama, tokenizer, tmp_path / "two", num_labels=2)
    with pytest.raises(EvalError, match=r"has 2 outputs; a reward model has one \(num_labels=1\)"):
        run_eval(EvalOptions(target=run, judge=str(two), out=tmp_path / "o"))
    with pytest.raises(EvalError) as caught:
        run_eval(EvalOptions(target=run, judge=str(two), out=tmp_path / "o"))
    assert "\n" not in str(caught.value)  # one line, as the CLI prints it
    assert not (tmp_path / "o").exists()
