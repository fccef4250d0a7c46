"""The peak-memory estimate and `gradient_checkpointing: auto`: the decision, its record, and (slow) the estimate
against the measured peak RSS of real training steps."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dpolab.config import ConfigError, DataConfig, LoraConfig, TrainConfig, load_config
from dpolab.data.prepare import prepare_data
from dpolab.engine import memory
from dpolab.engine.train import run_training
from tests.conftest import write_jsonl

REPO = Path(__file__).resolve().parents[1]
GiB = 2**30
SHAPE = memory.ModelShape(layers=4, hidden=128, intermediate=384, heads=4, vocab=1000, gated_mlp=True)


# --------------------------------------------------------------------------------------------- the decision
@pytest.mark.parametrize("requested, needed, available, expected", [
    (True, 1, 100 * GiB, True),  # forced on, however much room there is
    (False, 100 * GiB, 1 * GiB, False),  # forced off, however short the room is
    ("auto", 10 * GiB, 100 * GiB, False),
    ("auto", 10 * GiB, 12 * GiB, True),  # fits the raw figure, not its safety fraction
    ("auto", 10 * GiB, 14 * GiB, False),
    ("auto", 10 * GiB, None, False),
])
def test_the_decision(requested, needed, available, expected):
    assert memory.decide_checkpointing(requested, needed, available) is expected


def test_estimate_parts_follow_the_formula():
    est = memory.estimate_memory(SHAPE, params=1_000_000, trainable=1_000_000, step=memory.StepShape(2, 1000, 500))
    assert (est.weights, est.grads, est.optimizer) == (4e6, 4e6, 8e6)
    assert est.activations == pytest.approx(2000 * memory.activation_bytes_per_token(SHAPE, half=False), abs=1)
    assert est.reference == 0 and est.autocast_copies == 0
    assert est.mask == 4 * SHAPE.layers * 2 * 1000**2  # each layer's fp32 copy of the (R, W, W) mask
    assert est.training == est.weights + est.grads + est.optimizer + est.activations + est.mask + est.head
    double = memory.estimate_memory(SHAPE, params=1_000_000, trainable=1_000_000, step=memory.StepShape(4, 1000, 500))
    assert double.activations == pytest.approx(2 * est.activations, abs=2)
    on = memory.estimate_memory(SHAPE, params=1_000_000, trainable=1_000_000, step=memory.StepShape(2, 1000, 500), checkpointing=True)
    assert on.activations < est.activations / 2 and on.mask == est.mask / SHAPE.layers
    half = memory.estimate_memory(SHAPE, params=1_000_000, trainable=1_000_000, step=memory.StepShape(2, 1000, 500), half=True)
    assert half.activations < est.activations and half.autocast_copies == 2e6


def test_a_separate_reference_model_counts_in_the_reference_pass():
    own = memory.estimate_memory(SHAPE, 10**8, 10**8, memory.StepShape(1, 100, 50), reference_params=0)
    other = memory.estimate_memory(SHAPE, 10**8, 10**8, memory.StepShape(1, 100, 50), reference_params=10**9)
    assert own.peak == own.training  # the policy as its own reference: the pass adds no weights
    assert other.reference == own.reference + 4 * 10**9 and other.peak == other.reference


def test_the_output_head_keeps_its_logits_only_up_to_the_limit():
    small = memory.head_bytes(kept=100, vocab=1000, hidden=8, grad=True, keep_limit=10**6)
    large = memory.head_bytes(kept=1000, vocab=1000, hidden=8, grad=True, keep_limit=10**6)
    assert small == 4 * 100 * 1000 + 4 * 100 * 8 + 2 * 4 * 100 * 1000
    assert large == 4 * 1000 * 8 + 2 * 4 * 1000 * 1000  # recomputed: no (K, V) kept
    assert memory.head_bytes(kept=100, vocab=1000, hidden=8, grad=False, keep_limit=10**6) == 2 * 4 * 100 * 1000


def test_shapes_come_from_the_model_config():
    from transformers import GPT2Config, LlamaConfig

    llama = memory.model_shape(LlamaConfig(hidden_size=64, intermediate_size=176, num_hidden_layers=3,
                                           num_attention_heads=4, vocab_size=500))
    assert llama == memory.ModelShape(layers=3, hidden=64, intermediate=176, heads=4, vocab=500, gated_mlp=True)
    gpt2 = memory.model_shape(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=500))
    assert gpt2 == memory.ModelShape(layers=2, hidden=64, intermediate=256, heads=4, vocab=500, gated_mlp=False)
    # The per-token coefficient grows with every dimension it is derived from.
    base = memory.activation_bytes_per_token(llama, half=False)
    for field in ("layers", "hidden", "intermediate", "heads"):
        bigger = memory.ModelShape(**{**llama.__dict__, field: getattr(llama, field) * 2})
        assert memory.activation_bytes_per_token(bigger, half=False) > base, field


def test_lora_trains_only_the_adapter(tiny_llama):
    from dpolab.engine.train import count_parameters, trainable_parameters

    params, config = count_parameters(str(tiny_llama))
    full = TrainConfig(model=str(tiny_llama))
    lora = TrainConfig(model=str(tiny_llama), lora=LoraConfig(r=4))
    assert trainable_parameters(full, config, params) == params
    adapter = trainable_parameters(lora, config, params)
    # r·(in + out) per adapted linear: q, k, v, o, gate, up, down in each of the 2 layers
    h, i, kv = config.hidden_size, config.intermediate_size, config.num_key_value_heads * config.head_dim
    assert adapter == 2 * 4 * ((h + h) + 2 * (h + kv) + (h + h) + 2 * (h + i) + (i + h))
    shape = memory.model_shape(config)
    a = memory.estimate_memory(shape, params, params, memory.StepShape(1, 100, 50))
    b = memory.estimate_memory(shape, params, adapter, memory.StepShape(1, 100, 50))
    assert b.weights == a.weights and b.optimizer == 8 * adapter < a.optimizer and b.grads < a.grads


def test_meminfo_and_the_machine():
    assert memory._meminfo_available("MemTotal: 100 kB\nMemAvailable:   2048 kB\n") == 2048 * 1024
    assert memory._meminfo_available("MemTotal: 100 kB\n") is None
    available, source = memory.available_memory("cpu")
    assert available > 0 and source


def test_the_step_is_the_largest_batch_as_laid_out():
    from dpolab.engine.trainer import DPOCollator

    records = [{"prompt_ids": [1] * p, "chosen_ids": [2] * c, "rejected_ids": [3] * r}
               for p, c, r in ((5, 3, 2), (20, 10, 4), (8, 2, 2), (30, 1, 1))]
    # The two longest pairs, 2 rows each, as wide as the longest sequence (30 + 1); a kept position per response token
    assert memory.step_shape(records, 2, DPOCollator("padded", 0, 64)) == memory.StepShape(4, 31, (10 + 4) + (1 + 1))
    # One row; the prompt's last position predicts both responses' first tokens
    squares = 34**2 + 32**2  # the two pairs' own masks (attention pair by pair)
    assert memory.step_shape(records, 2, DPOCollator("packed", 0, 100)) == memory.StepShape(1, 34 + 32, 13 + 1, squares)
    # Over the row budget: two rows, as wide as the longer pair
    assert memory.step_shape(records, 2, DPOCollator("packed", 0, 40)) == memory.StepShape(2, 34, 13 + 1, squares)
    # FlexAttention: one row whatever the budget, and no dense mask to keep
    flex = memory.step_shape(records, 2, DPOCollator("packed", 0, 40, attention="flex"))
    assert flex == memory.StepShape(1, 34 + 32, 13 + 1, squares)
    assert memory.estimate_memory(SHAPE, 10, 10, flex, dense_mask=False).mask == 0
    # Pair by pair: the same row, each pair's mask; the dense mask would be the whole row's
    pairs = memory.step_shape(records, 2, DPOCollator("packed", 0, 40, attention="pairs"))
    assert memory.estimate_memory(SHAPE, 10, 10, pairs, dense_mask=False, pair_masks=True).mask == (
        4 * SHAPE.layers * squares)
    assert memory.estimate_memory(SHAPE, 10, 10, pairs).mask == 4 * SHAPE.layers * (34 + 32) ** 2


# --------------------------------------------------------------------------------------------- config and CLI
def test_config_values(tmp_path):
    assert TrainConfig().gradient_checkpointing == "auto"
    path = tmp_path / "c.yaml"
    path.write_text("gradient_checkpointing: true\n")
    assert load_config(TrainConfig, path).gradient_checkpointing is True
    path.write_text("gradient_checkpointing: off\n")  # YAML 1.1: a boolean
    assert load_config(TrainConfig, path).gradient_checkpointing is False
    for word, value in (("on", True), ("off", False), ("auto", "auto"), ("TRUE", True)):  # as the CLI passes them
        assert load_config(TrainConfig, None, {"gradient_checkpointing": word}).gradient_checkpointing == value
    with pytest.raises(ConfigError, match="gradient_checkpointing: Value error, must be auto, on or off") as err:
        load_config(TrainConfig, None, {"gradient_checkpointing": "maybe"})
    assert "\n" not in str(err.value)


def test_sweeps_may_set_it_and_search_over_it(tmp_path):
    from dpolab.sweep.config import Param, SweepConfig, trial_config

    sweep = SweepConfig(base=TrainConfig(gradient_checkpointing=True), sweep_dir=tmp_path,
                        search_space={"gradient_checkpointing": Param(type="categorical", choices=[True, False, "auto"])},
                        sampler="grid", n_trials=3)
    values = [trial_config(sweep, {"gradient_checkpointing": v}, n, tmp_path / "data").gradient_checkpointing
              for n, v in enumerate(sweep.search_space["gradient_checkpointing"].grid())]
    assert values == [True, False, "auto"]
    assert trial_config(sweep, {}, 0, tmp_path / "data").gradient_checkpointing is True


# --------------------------------------------------------------------------------------------- runs
@pytest.fixture(scope="module")
def data(tmp_path_factory, tokenizer, tiny_llama):
    rows = [{"prompt": f"Question {i}: what is {i} plus one?", "chosen": f"It is {i + 1}.", "rejected": f"No idea {i}."}
            for i in range(12)]
    src = write_jsonl(tmp_path_factory.mktemp("src") / "pairs.jsonl", rows)
    out = tmp_path_factory.mktemp("prepared") / "data"
    prepare_data(DataConfig(dataset=str(src), tokenizer=str(tiny_llama), test_size=0.25), out, tokenizer=tokenizer)
    return out


def _run(tiny_llama, data, out, **kw):
    return run_training(TrainConfig(output_dir=out, model=str(tiny_llama), data=DataConfig(dataset=str(data)),
                                    max_steps=1, batch_size=4, report_to=[], eval_every="no", **kw))


def test_auto_is_resolved_logged_and_recorded(tiny_llama, data, tmp_path, monkeypatch, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="dpolab"):
        roomy = _run(tiny_llama, data, tmp_path / "roomy")
    assert "gradient checkpointing off (auto): estimated peak" in caplog.text
    info = roomy.metrics["memory"]
    assert info["requested"] == "auto" and info["gradient_checkpointing"] is False
    assert info["estimate_without_checkpointing"]["tokens"] > 0 and info["available_bytes"] > 0
    assert yaml.safe_load((tmp_path / "roomy" / "config.yaml").read_text())["gradient_checkpointing"] is False
    assert json.loads((tmp_path / "roomy" / "metrics.json").read_text())["memory"] == info
    args = json.loads((tmp_path / "roomy" / "model" / "training_args.json").read_text())
    assert args["activation_checkpointing"] is False

    # A machine with less room than the estimate: auto turns checkpointing on, and the trainer applies it.
    needed = info["estimate_without_checkpointing"]["peak"]
    monkeypatch.setattr(memory, "available_memory", lambda device: (needed, "test"))
    tight = _run(tiny_llama, data, tmp_path / "tight")
    assert tight.metrics["memory"]["gradient_checkpointing"] is True
    assert json.loads((tmp_path / "tight" / "model" / "training_args.json").read_text())["activation_checkpointing"]
    assert yaml.safe_load((tmp_path / "tight" / "config.yaml").read_text())["gradient_checkpointing"] is True
    # Forced off even so.
    forced = _run(tiny_llama, data, tmp_path / "forced", gradient_checkpointing=False)
    assert forced.metrics["memory"]["gradient_checkpointing"] is False
    assert forced.metrics["memory"]["requested"] is False


# --------------------------------------------------------------------------------------------- against the machine
PEAK_CHILD = """
import json, sys
import torch
from transformers import TrainerCallback
from dpolab.config import TrainConfig
from dpolab.engine.train import run_training
import dpolab.engine.trainer  # noqa: F401  (imports of the run itself belong to the baseline)

# Pools that start lazily (OpenMP threads, the autograd engine, AdamW's kernels) belong to the baseline too.
layer = torch.nn.Linear(64, 64)
layer(torch.randn(8, 64)).sum().backward()
torch.optim.AdamW(layer.parameters(), fused=True).step()

def status(field):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(field + ":"))

def rss():
    return status("VmRSS")

class Peak(TrainerCallback):
    # VmHWM, not ru_maxrss: Linux carries the parent's high-water mark over fork+exec into ru_maxrss, so a child of
    # a large pytest process would report the parent's size (2.4 GB here instead of 0.8).
    def on_train_end(self, args, state, control, **kw):  # before the model is saved
        self.peak = status("VmHWM")

baseline, peak = rss(), Peak()
result = run_training(TrainConfig.model_validate_json(sys.argv[1]), callbacks=[peak])
print(json.dumps({"baseline": baseline, "peak": peak.peak, "memory": result.metrics["memory"]}))
"""


@pytest.fixture(scope="module")
def mid_llama(tmp_path_factory, tokenizer):
    """A 20M-parameter Llama (random init): activations and weights of the same order, fast on a CPU."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=1024, num_hidden_layers=8,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    path = tmp_path_factory.mktemp("mid-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.slow
def test_estimate_within_30_percent_of_measured_peak_rss(mid_llama, tokenizer, tmp_path):
    """Two steps of full fp32 training without checkpointing, in a fresh process, at two tokens-per-step sizes.
    Measured: the peak RSS (VmHWM) when training ends (model load, reference pass, two optimizer steps) minus the process's RSS
    after imports and a warm-up; the estimate excludes that baseline the same way (it is already in use)."""
    words = " ".join(f"w{k}" for k in range(30))
    rows = [{"prompt": f"{i} {words}?", "chosen": f"{words} {i}.", "rejected": f"{i} {words} no."} for i in range(40)]
    src = write_jsonl(tmp_path / "pairs.jsonl", rows)
    data = tmp_path / "data"
    prepare_data(DataConfig(dataset=str(src), tokenizer=str(mid_llama), test_size=0.1), data, tokenizer=tokenizer)
    results = {}
    for batch in (4, 12):
        cfg = TrainConfig(output_dir=tmp_path / f"b{batch}", model=str(mid_llama), data=DataConfig(dataset=str(data)),
                          max_steps=2, batch_size=batch, report_to=[], eval_every="no", save_every="steps",
                          save_steps=10**6, gradient_checkpointing=False, precision="fp32")
        run = subprocess.run([sys.executable, "-c", PEAK_CHILD, cfg.model_dump_json(exclude_unset=True)], cwd=REPO,
                             capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        out = json.loads(run.stdout.strip().splitlines()[-1])
        estimate = out["memory"]["estimate_without_checkpointing"]
        results[batch] = (out["peak"] - out["baseline"], estimate["peak"], estimate["tokens"])
        print(batch, {k: v if k in ("tokens", "kept") else round(v / 2**20) for k, v in estimate.items()})
    print({b: f"measured {m / 2**20:.0f} MiB, estimated {e / 2**20:.0f} MiB, {t} tokens/step"
           for b, (m, e, t) in results.items()})
    assert results[12][2] > 2.5 * results[4][2]
    for batch, (measured, estimated, _) in results.items():
        assert abs(estimated - measured) <= 0.3 * measured, (batch, measured, estimated)
