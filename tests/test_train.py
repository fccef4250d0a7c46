"""run_training end to end on a tiny model: artifacts, resume after SIGKILL, incomplete checkpoints, errors."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dpolab.config import ConfigError, DataConfig, TrainConfig
from dpolab.data.prepare import prepare_data
from dpolab.engine.train import run_training
from dpolab.engine.trainer import COMPLETE_MARKER, is_complete, last_complete_checkpoint
from tests.conftest import write_jsonl

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def small_data(tmp_path_factory, tokenizer, tiny_llama):
    rows = [{"prompt": f"Question number {i}: what is {i} plus {i}?", "chosen": f"It is {2 * i}.",
             "rejected": f"Maybe {i * 3 + 1}, who cares."} for i in range(30)]
    src = write_jsonl(tmp_path_factory.mktemp("src") / "pairs.jsonl", rows)
    out = tmp_path_factory.mktemp("prepared") / "data"
    prepare_data(DataConfig(dataset=str(src), tokenizer=str(tiny_llama), test_size=0.2), out, overwrite=True,
                 tokenizer=tokenizer)
    return out


def _cfg(tiny_llama, small_data, out, **kw):
    base = dict(output_dir=out, model=str(tiny_llama), data=DataConfig(dataset=str(small_data)), epochs=2,
                batch_size=4, learning_rate=1e-3, report_to=[], logging_steps=1, seed=3, eval_every="no",
                save_every="steps", save_steps=3, save_total_limit=10)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_llama, small_data):
    out = tmp_path_factory.mktemp("runs") / "full"
    run_training(_cfg(tiny_llama, small_data, out))
    return out


def test_run_folder_artifacts_load_without_dpolab(tiny_llama, small_data, tmp_path):
    out = tmp_path / "run"
    result = run_training(_cfg(tiny_llama, small_data, out, eval_every="epoch", save_every="epoch",
                               report_to=["tensorboard"]))
    for name in ("config.yaml", "data_report.json", "metrics.json", "trainer_state.json"):
        assert (out / name).is_file(), name
    assert list((out / "logs").glob("events.out.tfevents.*"))
    model_files = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                   "model.safetensors", "training_args.bin", "training_args.json"}
    assert model_files <= {p.name for p in (out / "model").iterdir()}
    args = json.loads((out / "model" / "training_args.json").read_text())
    assert args["learning_rate"] == 1e-3 and args["per_device_train_batch_size"] == 4 and args["seed"] == 3
    assert args["num_train_epochs"] == 2 and args["metric_for_best_model"] == "eval_loss"
    metrics = json.loads((out / "metrics.json").read_text())
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert metrics["best"]["loss"] == min(h["eval_loss"] for h in history if "eval_loss" in h)
    assert result.metrics["best"] == metrics["best"]
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert key in metrics["best"]
    script = textwrap.dedent(f"""
        import sys, torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        assert "dpolab" not in sys.modules
        tok = AutoTokenizer.from_pretrained({str(out / 'model')!r})
        model = AutoModelForCausalLM.from_pretrained({str(out / 'model')!r})
        ids = tok("Q: what is 2 plus 2?\\nA:", return_tensors="pt")
        out = model.generate(**ids, max_new_tokens=5, do_sample=False)
        assert out.shape[1] == ids.input_ids.shape[1] + 5
        assert "dpolab" not in sys.modules
        print("ok")
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd="/")
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-2000:]


def test_finished_run_is_refused_without_overwrite(uninterrupted, tiny_llama, small_data):
    with pytest.raises(ConfigError, match="already holds a finished run"):
        run_training(_cfg(tiny_llama, small_data, uninterrupted))


SLOW_RUN = """
import sys, time
from transformers import TrainerCallback
from dpolab.config import TrainConfig
from dpolab.engine.train import run_training

class Slow(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        time.sleep(0.4)

cfg = TrainConfig.model_validate_json(sys.argv[1])
run_training(cfg, resume=len(sys.argv) > 2, callbacks=[Slow()])
"""


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "model" / "model.safetensors")


def test_sigkill_then_resume_reaches_same_weights(uninterrupted, tiny_llama, small_data, tmp_path):
    out = tmp_path / "killed"
    cfg = _cfg(tiny_llama, small_data, out)
    # exclude_unset: what was asked for, as a YAML config would say it (the data's own settings fill the rest).
    proc = subprocess.Popen([sys.executable, "-c", SLOW_RUN, cfg.model_dump_json(exclude_unset=True)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (out / "checkpoints" / "checkpoint-6" / COMPLETE_MARKER).is_file():
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (out / "checkpoints" / "checkpoint-6" / COMPLETE_MARKER).is_file()
    assert not (out / "metrics.json").exists()
    with pytest.raises(ConfigError, match="--resume"):
        run_training(cfg)
    run_training(cfg, resume=True)
    expected, got = _weights(uninterrupted), _weights(out)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=0, msg=name)


def test_incomplete_newest_checkpoint_is_never_resumed(uninterrupted, tiny_llama, small_data, tmp_path):
    import shutil

    out = tmp_path / "partial"
    shutil.copytree(uninterrupted, out)
    (out / "metrics.json").unlink()
    shutil.rmtree(out / "model")
    checkpoints = out / "checkpoints"
    newest = max(checkpoints.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    # A kill during a save: the newest checkpoint's weights are cut short (its marker is from an earlier write).
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    second = sorted(checkpoints.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[-2]
    (second / COMPLETE_MARKER).unlink()  # and one that never got its marker at all
    assert not is_complete(newest) and not is_complete(second)
    chosen, incomplete = last_complete_checkpoint(checkpoints)
    assert chosen is not None and int(chosen.name.split("-")[1]) < int(second.name.split("-")[1])
    assert set(incomplete) == {newest, second}
    run_training(_cfg(tiny_llama, small_data, out), resume=True)
    assert (out / "checkpoints-incomplete" / newest.name).is_dir()
    for name, tensor in _weights(uninterrupted).items():
        torch.testing.assert_close(_weights(out)[name], tensor, atol=1e-6, rtol=0, msg=name)


def test_tokenizer_mismatch_and_context_errors(tiny_gpt2, small_data, tmp_path, tiny_llama):
    from transformers import AutoTokenizer

    other = tmp_path / "other-tok"
    import shutil

    shutil.copytree(tiny_llama, other)
    tok = AutoTokenizer.from_pretrained(other)
    tok.add_tokens(["<extra-token>"])
    tok.save_pretrained(other)
    with pytest.raises(ConfigError, match="prepared with the tokenizer"):
        run_training(_cfg(str(other), small_data, tmp_path / "r1"))
    with pytest.raises(ConfigError, match="exceeds"):
        run_training(_cfg(tiny_llama, small_data, tmp_path / "r2", data=DataConfig(dataset="demo", max_length=4096)))
    with pytest.raises(ConfigError, match=r"data\.max_length 4096 \(the data has 512\)"):
        run_training(_cfg(tiny_llama, small_data, tmp_path / "r3",
                          data=DataConfig(dataset=str(small_data), max_length=4096)))


@pytest.mark.parametrize("config", ["configs/demo.yaml", "configs/seed-gpt2-static-hh.yaml"])
def test_shipped_configs_dry_run(config):
    run = subprocess.run([sys.executable, "-m", "dpolab", "train", "-c", config, "--dry-run"], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "plan:" in run.stdout and "total_steps" in run.stdout


def test_lora_run_writes_merged_model_and_adapter(tiny_llama, small_data, tmp_path):
    from transformers import AutoModelForCausalLM

    from dpolab.config import LoraConfig

    out = tmp_path / "lora"
    result = run_training(_cfg(tiny_llama, small_data, out, lora=LoraConfig(r=4, alpha=8, dropout=0.0), epochs=1,
                               learning_rate=1e-2, save_every="epoch", eval_every="epoch"))
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert list((out / "adapter").glob("adapter_model.safetensors"))
    merged = AutoModelForCausalLM.from_pretrained(out / "model")
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    changed = [n for n, p in merged.named_parameters() if not torch.equal(p, dict(base.named_parameters())[n])]
    assert changed and all("proj" in n for n in changed)  # only LoRA-targeted linear layers moved
    assert result.metrics["best"]["loss"] < 0.69  # the adapter learned (eval loss below ln 2)


def test_unknown_model_offline_names_the_alternatives(small_data, tmp_path, monkeypatch):
    from dpolab.models import ModelNotFound

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFound, match="smollm2-135m-instruct.*run folder"):
        run_training(TrainConfig(output_dir=tmp_path / "r", model="no-such-org/no-such-model",
                                 data=DataConfig(dataset=str(small_data))))
    with pytest.raises(ModelNotFound, match="no such run or model folder"):
        run_training(TrainConfig(output_dir=tmp_path / "r", model="./missing/folder", data=DataConfig(dataset=str(small_data))))
    assert not (tmp_path / "r").exists()  # failed before any heavy work or any file written


def test_a_prepared_folder_decides_the_data_settings(tmp_path, tokenizer, tiny_llama):
    import yaml

    rows = [{"prompt": f"Question {i}?", "chosen": f"Answer {i}.", "rejected": f"No {i}."} for i in range(12)]
    src = write_jsonl(tmp_path / "rows.jsonl", rows)
    data = tmp_path / "data"
    prepare_data(DataConfig(dataset=str(src), tokenizer=str(tiny_llama), template="raw", max_length=64,
                            test_size=0.25), data, tokenizer=tokenizer)
    out = tmp_path / "run"
    cfg = TrainConfig(output_dir=out, model=str(tiny_llama), data=DataConfig(dataset=str(data)), max_steps=1,
                      batch_size=4, report_to=[], eval_every="no")
    run_training(cfg)
    recorded = yaml.safe_load((out / "config.yaml").read_text())["data"]
    assert (recorded["template"], recorded["max_length"], recorded["test_size"]) == ("raw", 64, 0.25)
    meta = json.loads((out / "model" / "dpolab.json").read_text())
    assert (meta["template"], meta["max_length"]) == ("raw", 64)
    from dpolab.engine.train import with_data_settings

    assert with_data_settings(cfg).token_budget is None and with_data_settings(cfg).data.max_length == 64
    contradicting = TrainConfig(output_dir=tmp_path / "other", model=str(tiny_llama), max_steps=1,
                                data=DataConfig(dataset=str(data), template="qa", max_length=64))
    with pytest.raises(ConfigError, match=r"data\.template 'qa' \(the data has 'raw'\)"):
        run_training(contradicting)
    assert not (tmp_path / "other").exists()


def test_resume_with_nothing_to_resume_says_so(tiny_llama, small_data, tmp_path, caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="dpolab"):
        run_training(_cfg(tiny_llama, small_data, tmp_path / "fresh", max_steps=1), resume=True)
    assert "no complete checkpoint" in caplog.text and "starts from the beginning" in caplog.text


def test_stop_request_saves_a_checkpoint_and_resume_reaches_same_weights(uninterrupted, tiny_llama, small_data,
                                                                          tmp_path):
    """The studio's Stop: a request file in the run folder ends training at the next step with a complete checkpoint
    (step 4 here, between the scheduled saves at 3 and 6); --resume then ends where an uninterrupted run ends."""
    from transformers import TrainerCallback

    from dpolab.folders.run import RunFolder

    out = tmp_path / "stopped"
    run = RunFolder(out)

    class AskAtStep4(TrainerCallback):  # as if someone clicked Stop during step 4
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == 3:
                run.request_stop()

    cfg = _cfg(tiny_llama, small_data, out)
    result = run_training(cfg, callbacks=[AskAtStep4()])
    assert result.extra == {"stopped": True} and result.metrics["stopped_at_step"] == 4
    assert is_complete(out / "checkpoints" / "checkpoint-4")
    assert not (out / "metrics.json").exists() and not (out / "model").exists() and not run.stop_requested()
    progress = run.read_progress()
    assert progress.step == 4 and progress.max_steps == 12 and 0 < progress.fraction < 1
    assert [p["step"] for p in progress.history] == [1, 2, 3, 4] and all("loss" in p for p in progress.history)
    with pytest.raises(ConfigError, match="--resume"):
        run_training(cfg)
    run_training(cfg, resume=True)
    progress = run.read_progress()
    assert progress.step == 12 and progress.eta_s == 0
    assert [p["step"] for p in progress.history if "loss" in p] == list(range(1, 13))
    expected, got = _weights(uninterrupted), _weights(out)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=0, msg=name)
