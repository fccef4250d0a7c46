"""engine/pair_attention.py: SDPA pair by pair against SDPA over whole rows with the dense mask (the fallback), in fp32
on CPU — per-sequence log-probs within 1e-5 relative and every parameter gradient."""

import json

import pytest
import torch
from conftest import random_pairs

from dpolab.engine import flex, pair_attention
from dpolab.engine.layout import packed_batch, packed_mask
from dpolab.engine.logprobs import batch_logps


def test_blocks_are_the_dense_masks_diagonal_and_cover_every_pair():
    """Each block's mask is the dense mask's diagonal block at its span, the dense mask is empty outside the blocks
    (so nothing is lost by skipping it), and the spans cover every real token once (padded rows too)."""
    for seed in range(6):
        pairs = random_pairs(3 + seed, seed, longest=(20, 90, 200)[seed % 3])
        for attention in ("sdpa", "pairs"):
            batch = packed_batch(pairs, 0, 300, attention=attention)
            owner, kind = batch["owner"], batch["kind"]
            dense = packed_mask(owner, kind)[:, 0]  # (R, L, L)
            covered = torch.zeros_like(dense)
            blocks = pair_attention.pair_blocks(owner, kind)
            assert len(blocks) == len(pairs)
            for row, start, end, mask in blocks:
                assert torch.equal(mask[0, 0], dense[row, start:end, start:end])
                assert (owner[row, start:end] == owner[row, start]).all() and owner[row, start] >= 0
                covered[row, start:end, start:end] = True
            real = owner >= 0  # (R, L)
            outside = dense & ~covered & real[:, :, None]
            assert not outside.any()
            assert sum(end - start for _, start, end, _ in blocks) == batch["real_tokens"]


def _logps_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    logps = batch_logps(model, batch)
    (logps * torch.linspace(-1.0, 1.0, logps.shape[0])).sum().backward()  # a different weight per sequence
    return logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_qwen2", "tiny_gpt2"])
@pytest.mark.parametrize("laid_out", ["pairs", "sdpa"])
def test_pairs_equal_dense_sdpa_logps_and_gradients(request, arch, laid_out, one_torch_thread):
    """The reference: SDPA over balanced rows with the dense mask. Against it: pair by pair, on the one-row layout
    (what training runs) and on the padded multi-row layout (padding between rows' ends handled)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(request.getfixturevalue(arch), attn_implementation="sdpa")
    pairs = random_pairs(6, 11, longest=80)
    expected, expected_grads = _logps_and_grads(model, packed_batch(pairs, 0, 200, prompt_targets=True))
    flex.use_attention(model, "pairs")
    assert model.config._attn_implementation == pair_attention.IMPLEMENTATION
    batch = packed_batch(pairs, 0, 200, prompt_targets=True, attention=laid_out)
    assert batch["input_ids"].shape[0] == (1 if laid_out == "pairs" else 3)
    got, grads = _logps_and_grads(model, batch)
    torch.testing.assert_close(got, expected, atol=0, rtol=1e-5)
    assert grads.keys() == expected_grads.keys()
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-5 * grad.abs().max().item(), rtol=1e-4, msg=name)


def test_pairs_under_gradient_checkpointing(tiny_llama, one_torch_thread):
    """Checkpointing recomputes each layer in backward: the blocks reach the recomputation too."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="sdpa")
    pairs = random_pairs(4, 5, longest=60)
    expected, expected_grads = _logps_and_grads(model, packed_batch(pairs, 0, 200))
    flex.use_attention(model, "pairs")
    model.gradient_checkpointing_enable()
    model.train()
    got, grads = _logps_and_grads(model, packed_batch(pairs, 0, 200, attention="pairs"))
    torch.testing.assert_close(got, expected, atol=0, rtol=1e-5)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-5 * grad.abs().max().item(), rtol=1e-4, msg=name)


def test_pairs_refuses_a_batch_without_blocks_and_is_not_saved(tiny_llama, tmp_path):
    """Outside packed batches the backend refuses (rather than attend without a mask); a model saved after
    `use_attention` loads with transformers' own attention, not this process's registered one."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="sdpa")
    flex.use_attention(model, "pairs")
    with pytest.raises(ValueError, match="packed batches only"):
        model(input_ids=torch.tensor([[1, 2, 3]]))
    model.save_pretrained(tmp_path / "saved")
    assert pair_attention.IMPLEMENTATION not in json.dumps(json.loads((tmp_path / "saved" / "config.json").read_text()))
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert again.config._attn_implementation == "sdpa"


def test_resolverandom_pairs(tiny_llama, tiny_gpt2):
    from transformers import AutoModelForCausalLM

    from dpolab.errors import ConfigError

    llama = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="sdpa")
    gpt2 = AutoModelForCausalLM.from_pretrained(tiny_gpt2, attn_implementation="sdpa")
    assert flex.resolve_attention("auto", "packed", llama, "cpu") == "pairs"  # flex has no backward on CPU
    assert flex.resolve_attention("auto", "packed", gpt2, "cpu") == "pairs"
    assert flex.resolve_attention("auto", "packed", gpt2, "cuda") == "sdpa"  # auto takes pairs off CUDA only
    assert flex.resolve_attention("pairs", "packed", llama, "cuda") == "pairs"
    assert flex.resolve_attention("auto", "padded", llama, "cpu") == "sdpa"
    assert flex.resolve_attention("sdpa", "packed", llama, "cpu") == "sdpa"
    llama.config.attn_logit_softcapping = 50.0  # what Gemma2 does: not plain SDPA
    assert flex.resolve_attention("auto", "packed", llama, "cpu") == "sdpa"
    with pytest.raises(ConfigError, match="soft-caps"):
        flex.resolve_attention("pairs", "packed", llama, "cpu")


def test_pair_attention_refuses_what_it_does_not_compute():
    """Soft-capped logits, attention sinks, a window shorter than a pair: an error, never silently other numbers."""
    q = torch.zeros(1, 2, 6, 4)
    blocks = pair_attention.pair_blocks(torch.tensor([[0, 0, 0, 1, 1, 1]]), torch.tensor([[0, 1, 2, 0, 1, 2]]))
    out, _ = pair_attention.pair_attention(None, q, q, q, pair_blocks=blocks, sliding_window=8)
    assert out.shape == (1, 6, 2, 4)
    for extra, match in (({"softcap": 30.0}, "softcap"), ({"s_aux": torch.zeros(2)}, "s_aux"),
                         ({"sliding_window": 2}, "sliding window")):
        with pytest.raises(ValueError, match=match):
            pair_attention.pair_attention(None, q, q, q, pair_blocks=blocks, **extra)
