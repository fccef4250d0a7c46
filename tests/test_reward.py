"""`--method reward` end to end on a tiny model: the config's edge checks, where the layouts read each score, a run
whose model/ loads with AutoModelForSequenceClassification and whose logged held-out accuracy and margin equal those
of that loaded model scoring each sequence alone (transformers' own pooling), LoRA with the score head saved, and eval.
"""

import json

import pytest
import torch

from dpolab.config import ConfigError, DataConfig, TrainConfig, load_config
from dpolab.data.prepare import load_prepared, prepare_data
from dpolab.engine.layout import packed_batch, padded_batch
from dpolab.engine.train import run_training
from tests.conftest import write_jsonl


@pytest.fixture(scope="module")
def data(tmp_path_factory, tokenizer, tiny_llama):
    rows = [{"prompt": f"Question {i}: what is {i} plus one?", "chosen": f"It is {i + 1}, since {i} and one make {i + 1}.",
             "rejected": "No."} for i in range(24)]
    src = write_jsonl(tmp_path_factory.mktemp("src") / "pairs.jsonl", rows)
    out = tmp_path_factory.mktemp("prepared") / "data"
    prepare_data(DataConfig(dataset=str(src), tokenizer=str(tiny_llama), test_size=0.25), out, tokenizer=tokenizer)
    return out


def _cfg(tiny_llama, data, out, **kw):
    # fp32, not `auto` (bf16 on a CPU with native bf16): the checks below score pairs alone in fp32
    return TrainConfig(**{**dict(output_dir=out, model=str(tiny_llama), data=DataConfig(dataset=str(data)),
                                 method="reward", max_steps=3, batch_size=6, learning_rate=3e-3, report_to=[],
                                 eval_every="epoch", save_every="epoch", precision="fp32"), **kw})


@pytest.mark.parametrize("overrides,message", [
    ({"method": "reward", "ref_model": "x"}, "reference-free"),
    ({"method": "reward", "beta": 0.3}, "no β: drop beta"),
    ({"method": "reward", "desirable_weight": 2.0}, "drop desirable_weight"),
    ({"method": "reward", "loss_type": "ipo"}, "choose among DPO losses"),
    ({"method": "reward", "label_smoothing": 0.1}, "label_smoothing applies"),
    ({"method": "reward", "data.unpaired": True}, "trains on pairs"),
    ({"method": "dpo", "center_rewards_coefficient": 0.01}, "applies to method reward"),
])
def test_reward_options_are_checked_at_the_edge(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TrainConfig, None, overrides)
    cfg = load_config(TrainConfig, None, {"method": "reward", "center_rewards_coefficient": 0.01})
    assert TrainConfig.model_validate(cfg.model_dump(mode="json")) == cfg  # a run's own config.yaml loads again


def test_layouts_read_scores_where_transformers_pools():
    pad = 2  # SmolLM2: pad = EOS; responses end with it, so the score sits on the token before
    pairs = [{"prompt_ids": [5, 6, 7], "chosen_ids": [8, 9, pad], "rejected_ids": [10, pad]},
             {"prompt_ids": [11, 12], "chosen_ids": [13], "rejected_ids": [pad]}]  # rejected: nothing but EOS
    for layout in ("padded", "packed"):
        batch = padded_batch(pairs, pad) if layout == "padded" else packed_batch(pairs, pad, 64)
        flat = batch["input_ids"].reshape(-1)
        read = flat[batch["score_index"]].tolist()
        # chosen 9, 13; rejected 10, and for the EOS-only answer the prompt's last token 12
        assert read == [9, 13, 10, 12], layout
    batch = padded_batch(pairs, pad)
    for row, index in enumerate(batch["score_index"].tolist()):  # transformers' rule: the rightmost non-pad token
        ids = batch["input_ids"][row]
        assert index - row * ids.shape[0] == int((torch.arange(ids.shape[0]) * (ids != pad)).argmax())


def _scores_alone(model_dir, records):
    """Each sequence scored alone by the saved model through transformers' own pooling: the independent oracle."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return [[model(torch.tensor([r["prompt_ids"] + r[side]])).logits.item() for r in records]
                for side in ("chosen_ids", "rejected_ids")]


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory, tiny_llama, data):
    from dpolab.engine import refcache

    def never(*args, **kwargs):
        raise AssertionError("a reward model entered the reference pass")

    saved = refcache.ensure_reference
    refcache.ensure_reference = never
    try:
        out = tmp_path_factory.mktemp("runs") / "reward"
        result = run_training(_cfg(tiny_llama, data, out, center_rewards_coefficient=0.01))
    finally:
        refcache.ensure_reference = saved
    return out, result


def test_reward_run_writes_a_sequence_classification_model(reward_run, data, tokenizer):
    from transformers import AutoConfig

    out, result = reward_run
    config = AutoConfig.from_pretrained(out / "model")
    assert config.num_labels == 1 and config.pad_token_id == tokenizer.pad_token_id
    assert config.architectures == ["LlamaForSequenceClassification"]
    assert (out / "model" / "model.safetensors").is_file() and result.ref_pairs_computed == 0
    meta = json.loads((out / "model" / "dpolab.json").read_text())
    assert meta["method"] == "reward" and meta["reference_model"] is None and meta["beta"] is None
    assert meta["center_rewards_coefficient"] == 0.01
    best = result.metrics["best"]
    for key in ("loss", "accuracy", "margin", "mean_reward", "rewards/chosen", "rewards/rejected"):
        assert best[key] == best[key], key  # logged, a number
    test = load_prepared(data).split("test")
    chosen, rejected = _scores_alone(out / "model", test)
    margins = [c - r for c, r in zip(chosen, rejected)]
    # model/ is the evaluated checkpoint: its logged held-out metrics are those of each pair scored alone
    assert best["accuracy"] == pytest.approx(sum(m > 0 for m in margins) / len(margins), abs=1e-9)
    assert best["margin"] == pytest.approx(sum(margins) / len(margins), abs=1e-5)
    centred = sum(torch.nn.functional.softplus(torch.tensor(-m)).item() + 0.01 * (c + r) ** 2
                  for m, c, r in zip(margins, chosen, rejected)) / len(margins)
    assert best["loss"] == pytest.approx(centred, abs=1e-5)


def test_lora_reward_run_trains_and_saves_the_score_head(tiny_llama, data, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    from dpolab.config import LoraConfig

    out = tmp_path / "lora"
    run_training(_cfg(tiny_llama, data, out, lora=LoraConfig(r=4, alpha=8, dropout=0.0), learning_rate=1e-2, seed=3))
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    assert any("score" in name for name in adapter) and any("lora_A" in name for name in adapter)
    merged = AutoModelForSequenceClassification.from_pretrained(out / "model")
    torch.manual_seed(3)  # the run's seed: the head as it was drawn before training
    start = AutoModelForSequenceClassification.from_pretrained(tiny_llama, num_labels=1)
    assert not torch.equal(merged.score.weight, start.score.weight)  # the head trained (in full) and was merged
    assert torch.equal(merged.model.embed_tokens.weight, start.model.embed_tokens.weight)  # not a LoRA target


def test_eval_of_a_reward_run_scores_pairs_with_an_interval(reward_run, data, tmp_path):
    from dpolab.evaluate.metrics import wilson_interval
    from dpolab.evaluate.run import EvalOptions, run_eval

    out, result = reward_run
    evaluation = run_eval(EvalOptions(target=str(out), out=tmp_path / "eval", batch_size=4))
    test = load_prepared(data).split("test")
    chosen, rejected = _scores_alone(out / "model", test)  # transformers' pooling, one sequence at a time
    assert evaluation["scores"]["chosen"] == pytest.approx(chosen, abs=1e-5)
    assert evaluation["scores"]["rejected"] == pytest.approx(rejected, abs=1e-5)
    m = evaluation["metrics"]["policy"]
    wins = sum(c > r for c, r in zip(chosen, rejected))
    assert m["pairs"] == len(test) and m["accuracy"] == pytest.approx(wins / len(test))
    assert (m["accuracy_ci_low"], m["accuracy_ci_high"]) == pytest.approx(wilson_interval(wins, len(test)))
    assert m["accuracy_ci_low"] <= m["accuracy"] <= m["accuracy_ci_high"] + 1e-12  # at p = 1 the bound is 1 − ε
    assert m["margin_mean"] == pytest.approx(sum(chosen) / len(test) - sum(rejected) / len(test), abs=1e-5)
    assert m["accuracy"] == pytest.approx(result.metrics["best"]["accuracy"])  # the logged eval_accuracy
    assert "generations" not in evaluation and evaluation["method"] == "reward"
    saved = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert saved["metrics"] == evaluation["metrics"] and (tmp_path / "eval" / "report.md").is_file()


def test_reward_metrics_by_hand():
    from dpolab.evaluate.reward import reward_metrics

    m = reward_metrics([1.0, 0.0, 2.0, 1.0], [0.0, 0.0, 3.0, -1.0])  # margins 1, 0 (a tie: half), −1, 2
    assert m["accuracy"] == pytest.approx(2.5 / 4) and m["pairs"] == 4
    assert m["margin_mean"] == pytest.approx(0.5) and m["margin_median"] == pytest.approx(0.5)
    # −log σ(m) = log(1 + e^−m): 0.31326, 0.69315, 1.31326, 0.12693
    assert m["loss"] == pytest.approx((0.3132617 + 0.6931472 + 1.3132617 + 0.1269280) / 4, abs=1e-6)
    # Wilson 95% for 2.5/4 (z = 1.96): centre (0.625 + 0.4802) / 1.9604 = 0.56376,
    # half-width 1.96·√(0.234375/4 + 3.8416/64) / 1.9604 = 0.34434
    assert (m["accuracy_ci_low"], m["accuracy_ci_high"]) == pytest.approx((0.21942, 0.90810), abs=1e-5)


def test_the_cli_evaluates_a_reward_run_and_refuses_to_chat_with_or_export_it(reward_run, tmp_path):
    import subprocess
    import sys

    from dpolab.cli.webapp import check_loadable
    from dpolab.errors import PublishError, UsageError
    from dpolab.publish import export_model

    out, _ = reward_run
    with pytest.raises(UsageError, match="reward model .* cannot generate"):
        check_loadable(str(out))
    with pytest.raises(PublishError, match="AutoModelForSequenceClassification"):
        export_model(out, tmp_path / "export")
    run = subprocess.run([sys.executable, "-m", "dpolab", "app", str(out)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "cannot generate" in run.stderr and "Traceback" not in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1
    shown = subprocess.run([sys.executable, "-m", "dpolab", "eval", str(out), "--out", str(tmp_path / "eval")],
                           capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "pairwise accuracy (95% CI)" in shown.stdout and "held-out pairs (n)" in shown.stdout


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_reward_run_on_real_hh_pairs_with_the_embedded_model(hh_path, tmp_path, tokenizer, embedded_dir):
    """2 steps on the shared HH pairs: a complete run folder, eval on it, and model/ loads without dpolab's help."""
    from transformers import AutoModelForSequenceClassification

    from dpolab import EMBEDDED_MODEL
    from dpolab.evaluate.run import EvalOptions, run_eval

    data = tmp_path / "hh"
    prepare_data(DataConfig(dataset=str(hh_path), template="raw", max_length=256, limit=40, test_size=0.2), data,
                 tokenizer=tokenizer)
    run = tmp_path / "rm"
    result = run_training(TrainConfig(output_dir=run, model=EMBEDDED_MODEL, method="reward", max_steps=2, batch_size=4,
                                      learning_rate=1e-5, report_to=[], data=DataConfig(dataset=str(data)),
                                      center_rewards_coefficient=0.01))
    for name in ("config.yaml", "data_report.json", "metrics.json", "trainer_state.json", "model/model.safetensors",
                 "model/config.json", "model/tokenizer.json", "model/dpolab.json"):
        assert (run / name).is_file(), name
    assert result.metrics["best"]["loss"] == result.metrics["best"]["loss"] and "accuracy" in result.metrics["best"]
    model = AutoModelForSequenceClassification.from_pretrained(run / "model").eval()
    assert model.config.num_labels == 1 and model.config.pad_token_id == tokenizer.pad_token_id
    evaluation = run_eval(EvalOptions(target=str(run)))
    test = load_prepared(data).split("test")
    m = evaluation["metrics"]["policy"]
    assert m["pairs"] == len(test) > 0 and m["accuracy_ci_low"] <= m["accuracy"] <= m["accuracy_ci_high"] + 1e-12
    record = test[0]  # the first pair, scored by the loaded model alone, as anyone would score it
    with torch.no_grad():
        alone = [model(torch.tensor([record["prompt_ids"] + record[side]])).logits.item()
                 for side in ("chosen_ids", "rejected_ids")]
    got = [evaluation["scores"]["chosen"][0], evaluation["scores"]["rejected"][0]]
    assert got == pytest.approx(alone, abs=1e-4)
    assert json.loads((run / "eval" / "eval.json").read_text())["method"] == "reward"


def test_a_margin_column_reaches_the_loss(tiny_llama, tokenizer, tmp_path):
    rows = [{"prompt": f"Question {i}: what is {i} plus one?", "chosen": f"It is {i + 1}.", "rejected": "No.",
             "margin": (i % 3) * 0.5} for i in range(16)]
    rows += [{"prompt": "Q?", "chosen": "A.", "rejected": "B.", "margin": "lots"}]
    src = write_jsonl(tmp_path / "pairs.jsonl", rows)
    report = prepare_data(DataConfig(dataset=str(src), tokenizer=str(tiny_llama), test_size=0.25), tmp_path / "data",
                          tokenizer=tokenizer)
    assert report["dropped"] == {"bad_margin": 1}  # "lots" is no number: the row is accounted for, not trained on
    test = load_prepared(tmp_path / "data").split("test")
    assert {r["margin"] for r in test} <= {0.0, 0.5, 1.0}
    result = run_training(_cfg(tiny_llama, tmp_path / "data", tmp_path / "run", max_steps=2))
    chosen, rejected = _scores_alone(tmp_path / "run" / "model", test)
    expected = sum(torch.nn.functional.softplus(torch.tensor(r["margin"] - (c - j))).item()
                   for r, c, j in zip(test, chosen, rejected)) / len(test)  # −log σ(Δ − m)
    assert result.metrics["best"]["loss"] == pytest.approx(expected, abs=1e-5)
