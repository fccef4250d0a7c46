"""GGUF export (llama.cpp, Ollama, LM Studio) with the `gguf` package's writer: a run's safetensors model as one file.

Design. Only what is known to be written correctly is written; anything else is refused with a one-line error:
- Architectures: Llama (SmolLM2, Llama 2-style, Mistral without a sliding window) -> llama.cpp `llama`, with Q and K
  rows permuted for llama.cpp's RoPE layout; Qwen2 -> `qwen2` (no permutation, QKV biases); GPT-2 -> `gpt2` (Conv1D
  weights transposed). RoPE: default and linear scaling; llama3/yarn/dynamic scaling is refused.
- Tokenizer: byte-level BPE from tokenizer.json (vocab, merges, special tokens, whether BOS/EOS are added, asked of
  the run's own tokenizer). llama.cpp splits text before BPE with a fixed regex per `tokenizer.ggml.pre`, so the
  pre-tokenizer is named from the tokenizer.json *structure* (PRE_TOKENIZERS), never guessed from a hash: the embedded
  SmolLM2 tokenizer (converted by transformers from GGUF) is plain ByteLevel, i.e. "gpt-2"; llama.cpp's own converter
  names it "smollm" (the upstream Hub tokenizer's digit split), which tokenizes 50 of 4,000 HH texts differently
  from the tokenizer the run was trained with (e.g. "\\n\\n1." -> "ĊĊ","1" instead of "Ċ","Ċ","1"); in llama.cpp
  itself dpolab's file tokenizes 1,000/1,000 HH texts like the run, the converter's 990 (bench/gguf_llamacpp.py).
- The prompt template the run was trained with goes in `tokenizer.chat_template` (see publish.modelfile), and the
  app's sampling defaults in `general.sampling.*`, which llama.cpp uses as its defaults.
- Tensor types follow llama.cpp's converter: 1-D tensors, norms and GPT-2's position embedding stay F32; the rest
  is F32/F16/BF16/Q8_0 (Q8_0 falls back to F16 for a row length that is not a multiple of 32).
Cost: the whole model is held in memory once as float32 (540 MB for the 135M model); writing it takes ~2 s (f16)
to ~3.5 s (q8_0, numpy quantization) here, and the files are 540 MB (f32), 271 MB (f16) and 145 MB (q8_0).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from dpolab.errors import PublishError
from dpolab.generation import GenerationSettings

QUANTS = ("f32", "f16", "bf16", "q8_0")
ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
                 "GPT2LMHeadModel": "gpt2"}
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
# tokenizer.json pre-tokenizer layouts whose llama.cpp `pre` splits text identically (llama-vocab.cpp regexes).
PRE_TOKENIZERS = {
    "gpt-2": [_BYTE_LEVEL],
    "smollm": [{"type": "Digits", "individual_digits": True}, _BYTE_LEVEL],
    "llama-bpe": [{"type": "Split", "pattern": {"Regex": _LLAMA3_SPLIT}}, {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}],
    "qwen2": [{"type": "Split", "pattern": {"Regex": _QWEN2_SPLIT}}, {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}],
}
_LAYERS = {
    "llama": (r"model\.layers\.(\d+)\.(.+)\.(weight|bias)",
              {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}),
    "gpt2": (r"(?:transformer\.)?h\.(\d+)\.(.+)\.(weight|bias)",
             {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
              "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}),
}
_GLOBALS = {
    "llama": {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight"},
    "gpt2": {"wte.weight": "token_embd.weight", "wpe.weight": "position_embd.weight", "ln_f.weight": "output_norm.weight",
             "ln_f.bias": "output_norm.bias", "lm_head.weight": "output.weight"},
}
_SKIP = re.compile(r".*\.attn\.(masked_)?bias$|.*rotary_emb\.inv_freq$")  # buffers, not weights


def gguf_name(name: str, quant: str) -> str:
    """MODEL-QUANT.gguf, the name safe for any file system and for Ollama's hf.co/OWNER/REPO:QUANT lookup."""
    return f"{re.sub(r'[^A-Za-z0-9._-]+', '-', name).strip('-.') or 'model'}-{quant}.gguf"


def _family(arch: str) -> str:
    return "gpt2" if arch == "gpt2" else "llama"  # qwen2 shares Llama's tensor names


def _rope(config: dict) -> tuple[float, float | None]:
    """(rope theta, linear scaling factor or None); transformers 5 writes rope_parameters, older configs rope_scaling."""
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind == "default":
        return theta, None
    if kind == "linear" and params.get("factor"):
        return theta, float(params["factor"])
    raise PublishError(f"cannot write RoPE scaling {kind!r} to GGUF correctly (supported: default, linear); "
                       "export with --format hf")


def check_architecture(config: dict) -> str:
    """The llama.cpp architecture for a config.json, or PublishError (one line) when it cannot be written exactly."""
    hf = (config.get("architectures") or ["?"])[0]
    arch = ARCHITECTURES.get(hf)
    problem = None
    if arch is None:
        problem = f"architecture {hf} is not supported (supported: {', '.join(ARCHITECTURES)})"
    elif arch == "gpt2":
        if config.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            problem = f"GPT-2 activation {config.get('activation_function')!r} (llama.cpp's gpt2 uses tanh GELU)"
        elif config.get("scale_attn_by_inverse_layer_idx") or config.get("scale_attn_weights") is False:
            problem = "GPT-2 attention scaling other than 1/sqrt(head_dim)"
    elif config.get("hidden_act", "silu") != "silu":
        problem = f"activation {config.get('hidden_act')!r} (llama.cpp's {arch} uses SiLU)"
    elif arch == "llama" and (config.get("attention_bias") or config.get("mlp_bias")):
        problem = "Llama with attention or MLP biases"
    elif config.get("use_sliding_window") or (hf == "MistralForCausalLM" and config.get("sliding_window")
                                              and config["sliding_window"] < config.get("max_position_embeddings", 0)):
        problem = "sliding-window attention"
    if problem:
        raise PublishError(f"cannot export {hf} to GGUF correctly: {problem}; export with --format hf")
    if arch != "gpt2":
        _rope(config)  # refuses unsupported scaling before any work
    return arch


def _hparams(writer, config: dict, arch: str, vocab_size: int) -> None:
    if arch == "gpt2":
        embd = config["n_embd"]
        writer.add_context_length(config.get("n_positions") or config.get("n_ctx"))
        writer.add_embedding_length(embd)
        writer.add_feed_forward_length(config.get("n_inner") or 4 * embd)
        writer.add_block_count(config["n_layer"])
        writer.add_head_count(config["n_head"])
        writer.add_layer_norm_eps(config.get("layer_norm_epsilon", 1e-5))
        writer.add_vocab_size(vocab_size)
        return
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    theta, factor = _rope(config)
    writer.add_rope_freq_base(theta)
    writer.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-6))
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_vocab_size(vocab_size)
    writer.add_rope_dimension_count(head_dim)
    if factor is not None:
        import gguf

        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(factor)


def tensor_name(hf_name: str, arch: str) -> str | None:
    """The GGUF name of a checkpoint tensor; None for buffers that are no weights. Unknown names are refused: a
    tensor silently left out would make a file that loads and computes something else."""
    family = _family(arch)
    if _SKIP.fullmatch(hf_name):
        return None
    bare = hf_name.removeprefix("transformer.") if family == "gpt2" else hf_name
    if bare in _GLOBALS[family]:
        return _GLOBALS[family][bare]
    pattern, parts = _LAYERS[family]
    match = re.fullmatch(pattern, hf_name)
    if match and match.group(2) in parts:
        return f"blk.{match.group(1)}.{parts[match.group(2)]}.{match.group(3)}"
    raise PublishError(f"cannot export to GGUF: no llama.cpp tensor for {hf_name!r}; export with --format hf")


def _permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """Q/K rows from Hugging Face's rotate-half RoPE layout to llama.cpp's interleaved one (its converter's permute)."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _transform(name: str, data: np.ndarray, config: dict, arch: str) -> np.ndarray:
    if arch == "gpt2" and name.endswith(("attn_qkv.weight", "attn_output.weight", "ffn_up.weight", "ffn_down.weight")):
        return np.ascontiguousarray(data.T)  # GPT-2's Conv1D stores (in, out); llama.cpp wants (out, in)
    if arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
        heads = config["num_attention_heads"]
        if name.endswith("attn_k.weight"):
            heads = config.get("num_key_value_heads") or heads
        return _permute(data, heads)
    return data


def tensor_type(name: str, data: np.ndarray, quant: str):
    """The GGML type a tensor is stored in (llama.cpp's converter rules)."""
    import gguf

    types = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
             "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}
    if data.ndim <= 1 or name.endswith("_norm.weight") or name.startswith("position_embd"):
        return gguf.GGMLQuantizationType.F32
    if quant == "q8_0" and data.shape[-1] % 32:
        return gguf.GGMLQuantizationType.F16
    return types[quant]


def _checkpoint(model_dir: Path) -> Iterator[tuple[str, np.ndarray]]:
    """(name, float32 array) for every tensor of a safetensors checkpoint, sharded or not (never a pickle)."""
    from safetensors import safe_open

    index = model_dir / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    for file in files:
        if not (model_dir / file).is_file():
            raise PublishError(f"cannot export to GGUF: {model_dir / file} is missing (safetensors weights needed)")
        with safe_open(model_dir / file, framework="pt") as handle:
            for key in handle.keys():
                yield key, handle.get_tensor(key).float().numpy()


def _tensors(model_dir: Path, config: dict, arch: str, quant: str) -> Iterator[tuple[str, np.ndarray, Any]]:
    import gguf

    tied = config.get("tie_word_embeddings", arch == "gpt2")
    seen = set()
    for hf_name, data in _checkpoint(model_dir):
        name = tensor_name(hf_name, arch)
        if name is None or (name == "output.weight" and tied):
            continue  # a tied output matrix is token_embd: llama.cpp reuses it when output.weight is absent
        seen.add(name)
        data = _transform(name, data, config, arch)
        qtype = tensor_type(name, data, quant)
        yield name, gguf.quants.quantize(data, qtype), qtype
    if "token_embd.weight" not in seen or ("output.weight" not in seen and not tied):
        raise PublishError(f"cannot export to GGUF: {model_dir} lacks the embedding or output weights")


def pre_tokenizer(tokenizer_json: dict) -> str:
    """llama.cpp's `tokenizer.ggml.pre` for a byte-level BPE tokenizer.json, or PublishError when none matches."""
    model, pre = tokenizer_json.get("model") or {}, tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise PublishError("cannot export this tokenizer to GGUF: only byte-level BPE tokenizers are supported "
                           f"(this one is {model.get('type')}{' with byte fallback' if model.get('byte_fallback') else ''})")
    normalizer = (tokenizer_json.get("normalizer") or {}).get("type")
    for name, layout in PRE_TOKENIZERS.items():
        if len(steps) == len(layout) and all(_matches(step, want) for step, want in zip(steps, layout)):
            ignores = name == "llama-bpe"
            if bool(model.get("ignore_merges")) == ignores and normalizer in (None, "NFC" if name == "qwen2" else None):
                return name
    raise PublishError("cannot export this tokenizer to GGUF: llama.cpp has no pre-tokenizer that splits text like "
                       f"its {json.dumps(pre)[:120]} (supported: {', '.join(PRE_TOKENIZERS)})")


def _matches(step: dict, want: dict) -> bool:
    for key, value in want.items():
        got = step.get(key)
        if isinstance(value, dict):
            if not isinstance(got, dict) or not _matches(got, value):
                return False
        elif got != value:
            return False
    return step.get("type") != "Split" or (step.get("behavior") == "Isolated" and not step.get("invert"))


def vocabulary(tokenizer_json: dict, vocab_size: int) -> tuple[list[str], list[int]]:
    """(tokens, token types) indexed by id, `vocab_size` long: special added tokens are CONTROL, other added tokens
    USER_DEFINED, ids the tokenizer does not use (embedding rows padded past it) UNUSED "[PADn]" as llama.cpp does."""
    import gguf

    tokens: list[str | None] = [None] * vocab_size
    types = [gguf.TokenType.NORMAL] * vocab_size
    entries = list(tokenizer_json["model"]["vocab"].items())
    added = [(a["content"], a["id"], a["special"]) for a in tokenizer_json.get("added_tokens", [])]
    if max([i for _, i in entries] + [i for _, i, _ in added]) >= vocab_size:
        raise PublishError(f"cannot export to GGUF: the tokenizer has ids past the model's vocab_size {vocab_size}")
    for token, index in entries:
        tokens[index] = token
    for token, index, special in added:
        tokens[index] = token
        types[index] = gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED
    for index, token in enumerate(tokens):
        if token is None:
            tokens[index], types[index] = f"[PAD{index}]", gguf.TokenType.UNUSED
    return tokens, [int(t) for t in types]


def _merges(tokenizer_json: dict) -> list[str]:
    return [m if isinstance(m, str) else " ".join(m) for m in tokenizer_json["model"].get("merges", [])]


def _special_ids(model_dir: Path, tokens: list[str]) -> dict[str, Any]:
    """Special token ids and whether the run's tokenizer adds BOS/EOS, asked of the tokenizer itself (not its flags)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    generation = model_dir / "generation_config.json"
    gen_eos = json.loads(generation.read_text()).get("eos_token_id") if generation.is_file() else None
    plain, special = tok("a", add_special_tokens=False).input_ids, tok("a").input_ids
    ids = {key: getattr(tok, f"{key}_token_id") for key in ("bos", "eos", "unk", "pad")}
    if isinstance(gen_eos, int):
        ids["eos"] = gen_eos  # what generation stops on in the app
    if ids["pad"] is None:
        ids["pad"] = ids["eos"]  # dpolab pads with EOS (models.load_tokenizer)
    return {"ids": ids, "add_bos": special[:1] != plain[:1], "add_eos": special[-1:] != plain[-1:],
            "chat_template": tok.chat_template if isinstance(tok.chat_template, str) else None, "tokenizer": tok}


def _tokenizer_kv(writer, model_dir: Path, vocab_size: int, template: str) -> dict[str, Any]:
    from dpolab.publish.modelfile import jinja_template

    tokenizer_json = json.loads((model_dir / "tokenizer.json").read_text()) if (model_dir / "tokenizer.json").is_file() \
        else None
    if tokenizer_json is None:
        raise PublishError(f"cannot export to GGUF: {model_dir} has no tokenizer.json (a fast tokenizer is needed)")
    pre = pre_tokenizer(tokenizer_json)
    tokens, types = vocabulary(tokenizer_json, vocab_size)
    special = _special_ids(model_dir, tokens)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(_merges(tokenizer_json))
    adders = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id, "unk": writer.add_unk_token_id,
              "pad": writer.add_pad_token_id}
    for key, token_id in special["ids"].items():
        if token_id is not None:
            adders[key](token_id)
    writer.add_add_bos_token(special["add_bos"])
    writer.add_add_eos_token(special["add_eos"])
    try:
        writer.add_chat_template(jinja_template(template, special["chat_template"]))
    except ValueError as exc:
        raise PublishError(f"cannot export to GGUF: {exc}") from None
    return {"pre": pre, **special}


def write_gguf(model_dir: Path, path: Path, quant: str, template: str, name: str,
               settings: GenerationSettings = GenerationSettings()) -> dict[str, Any]:
    """Write `path`; returns what the Modelfile and the card need (architecture, context, stop tokens, tokenizer)."""
    import gguf

    if quant not in QUANTS:
        raise PublishError(f"--quant must be one of {', '.join(QUANTS)}, got {quant!r}")
    config = json.loads((Path(model_dir) / "config.json").read_text())
    arch = check_architecture(config)
    vocab_size = config.get("vocab_size") or 0
    writer = gguf.GGUFWriter(path, arch)
    writer.add_type("model")
    writer.add_name(name)
    writer.add_string("dpolab.template", template)
    _hparams(writer, config, arch, vocab_size)
    info = _tokenizer_kv(writer, Path(model_dir), vocab_size, template)
    writer.add_sampling_temp(settings.temperature)
    writer.add_sampling_top_p(settings.top_p)
    writer.add_sampling_top_k(settings.top_k)
    writer.add_sampling_penalty_repeat(settings.repetition_penalty)
    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                  "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    writer.add_file_type(file_types[quant])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for tensor, data, qtype in _tensors(Path(model_dir), config, arch, quant):
        writer.add_tensor(tensor, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()
    tok, eos = info["tokenizer"], info["ids"]["eos"]
    context = config.get("max_position_embeddings") or config.get("n_positions")
    return {"architecture": arch, "context": context, "pre": info["pre"], "file": Path(path).name, "quant": quant,
            "stops": [tok.convert_ids_to_tokens(eos)] if eos is not None else [], "tokenizer": tok}
