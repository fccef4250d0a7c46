"""`--precision auto` from the hardware's facts, and what bf16 autocast training keeps in fp32."""

import pytest
import torch

from dpolab.runtime import auto_precision, cpu_flags, machine_facts, resolve_runtime


@pytest.mark.parametrize("device, facts, expected", [
    ("cuda", {"cuda_capability": (9, 0)}, "bf16"),  # Hopper
    ("cuda", {"cuda_capability": (8, 0)}, "bf16"),  # Ampere
    ("cuda", {"cuda_capability": (8, 6)}, "bf16"),
    ("cuda", {"cuda_capability": (7, 5)}, "fp32"),  # Turing: is_bf16_supported() may say True, by emulation
    ("cuda", {"cuda_capability": (6, 0)}, "fp32"),
    ("cuda", {"cuda_capability": None}, "fp32"),
    ("cpu", {"cpu_flags": frozenset({"avx2", "avx512f", "avx512_bf16"})}, "bf16"),
    ("cpu", {"cpu_flags": frozenset({"avx2", "amx_bf16", "amx_tile"})}, "bf16"),
    ("cpu", {"cpu_flags": frozenset({"avx", "avx2", "fma"})}, "fp32"),  # AVX2 only: bf16 emulated, several x slower
    ("cpu", {"cpu_flags": frozenset({"avx512f", "avx512_vnni"})}, "fp32"),
    ("cpu", {"cpu_flags": frozenset()}, "fp32"),  # no /proc/cpuinfo (macOS, Windows)
    ("cpu", {}, "fp32"),
])
def test_auto_precision(device, facts, expected):
    precision, why = auto_precision(device, **facts)
    assert precision == expected and why


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu avx2 avx512_bf16 amx_bf16\n\n"
                    "processor\t: 1\nflags\t\t: fpu avx2 avx512_bf16 amx_bf16\n")
    assert cpu_flags(info) == {"fpu", "avx2", "avx512_bf16", "amx_bf16"}
    assert cpu_flags(tmp_path / "missing") == frozenset()


def test_this_machine_resolves_by_its_own_facts():
    runtime = resolve_runtime("auto")
    assert runtime.precision == auto_precision(runtime.device, **machine_facts(runtime.device))[0]
    if runtime.device == "cpu" and not {"avx512_bf16", "amx_bf16"} & cpu_flags():
        assert runtime.precision == "fp32"
    assert resolve_runtime("bf16").precision == "bf16"  # asked for explicitly: given, native or not


def test_bf16_training_on_a_cpu_autocasts_over_fp32_master_weights(tiny_llama, tokenizer, tmp_path):
    """The trainer runs forward under bf16 autocast (matmul outputs in bf16) while the parameters, their gradients
    and AdamW's state stay fp32."""
    from transformers import TrainerCallback

    from dpolab.config import DataConfig, TrainConfig
    from dpolab.data.prepare import prepare_data
    from dpolab.engine.train import run_training
    from tests.conftest import write_jsonl

    rows = [{"prompt": f"Say {i}.", "chosen": f"{i}.", "rejected": f"Not {i + 1}."} for i in range(8)]
    data = tmp_path / "data"
    prepare_data(DataConfig(dataset=str(write_jsonl(tmp_path / "p.jsonl", rows)), tokenizer=str(tiny_llama),
                            test_size=0.0), data, tokenizer=tokenizer)
    seen = {}

    class Watch(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            def record(module, inputs, output):
                if module.training:  # not the reference pass
                    seen.setdefault("output", output.dtype)

            model.model.layers[0].mlp.up_proj.register_forward_hook(record)

        def on_step_end(self, args, state, control, model=None, optimizer=None, **kw):
            seen["params"] = {p.dtype for p in model.parameters()}
            seen["state"] = {t.dtype for s in optimizer.state.values() for t in s.values() if t.dim() > 0}

    result = run_training(TrainConfig(output_dir=tmp_path / "run", model=str(tiny_llama), precision="bf16",
                                      data=DataConfig(dataset=str(data)), max_steps=1, batch_size=4, report_to=[],
                                      eval_every="no"), callbacks=[Watch()])
    assert seen == {"output": torch.bfloat16, "params": {torch.float32}, "state": {torch.float32}}
    assert result.metrics["precision"] == "bf16"
