"""Shared fixtures: the embedded tokenizer, tiny random models built from a config, and the real HH data path."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

HH_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf" / "harmless-base-test.2000.jsonl.gz"
torch = pytest.importorskip("torch")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def missing(problem: str):
    """A real component a test needs is absent: fail under CI (its setup installs it), skip elsewhere."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{problem} (CI installs it: make test-setup)")
    pytest.skip(problem)


@pytest.fixture(scope="session")
def embedded_dir() -> Path:
    from dpolab.models import embedded_model_dir

    return embedded_model_dir()


@pytest.fixture(scope="session")
def tokenizer(embedded_dir):
    from dpolab.models import load_tokenizer

    return load_tokenizer(str(embedded_dir))


def _save_tiny(model, tokenizer, path: Path) -> Path:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, tokenizer) -> Path:
    """A 2-layer Llama with the SmolLM2 tokenizer (random weights, seeded)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return _save_tiny(LlamaForCausalLM(config), tokenizer, tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory, tokenizer) -> Path:
    """A 2-layer GPT-2 (the original study's architecture) with the SmolLM2 tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=4, n_positions=1024,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    return _save_tiny(GPT2LMHeadModel(config), tokenizer, tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture
def one_torch_thread():
    """Tiny models gain nothing from a second thread, and two-thread torch crawls when another process holds a core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def chatty_llama(tmp_path_factory, tokenizer) -> Path:
    """A tiny Llama whose weights are drawn wider than usual: greedy decoding then gives a different word salad per
    prompt (the default init repeats one token), so a mixed-up or cut answer cannot pass for the right one."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         initializer_range=0.3, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return _save_tiny(LlamaForCausalLM(config), tokenizer, tmp_path_factory.mktemp("chatty-llama"))


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory, tokenizer) -> Path:
    """A 2-layer Qwen2 (untied head, q/k/v biases) with the SmolLM2 tokenizer."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return _save_tiny(Qwen2ForCausalLM(config), tokenizer, tmp_path_factory.mktemp("tiny-qwen2"))


def write_jsonl(path: Path, rows: list) -> Path:
    with open(path, "w") as handle:
        for row in rows:
            handle.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


@pytest.fixture(scope="session")
def arithmetic_pairs(tmp_path_factory) -> Path:
    """24 small explicit preference pairs in a JSONL file: real training jobs on the tiny models in seconds."""
    rows = [{"prompt": f"Question {i}: what is {i} plus {i}?", "chosen": f"It is {2 * i}.",
             "rejected": f"Maybe {i * 3 + 1}."} for i in range(24)]
    return write_jsonl(tmp_path_factory.mktemp("arithmetic") / "pairs.jsonl", rows)


@pytest.fixture
def hh_path() -> Path:
    if not HH_DATA.is_file():
        pytest.fail(f"shared HH data missing at {HH_DATA}")
    return HH_DATA


def random_pairs(n: int, seed: int, longest: int = 90, vocab: int = 900) -> list[dict]:
    """n pairs of random token ids, each part 1..longest-1 tokens (seeded): layouts and attentions under test."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        p, c, r = (int(x) for x in torch.randint(1, longest, (3,), generator=g))
        out.append({k: torch.randint(10, vocab, (m,), generator=g).tolist()
                    for k, m in (("prompt_ids", p), ("chosen_ids", c), ("rejected_ids", r))})
    return out
