"""engine/flex.py: the packed layout's BlockMask against the dense SDPA mask, and the flex path's log-probs and
gradients against the SDPA path's."""

import pytest
import torch
from conftest import random_pairs

from dpolab.engine import flex
from dpolab.engine.layout import packed_batch, packed_mask
from dpolab.engine.logprobs import batch_logps


def _random_batches():
    """Rows of several pairs with padding (sdpa: balanced rows) and one unpadded row (flex), crossing tile edges."""
    for seed in range(6):
        pairs = random_pairs(3 + seed, seed, longest=(20, 90, 200)[seed % 3])
        yield packed_batch(pairs, 0, 300)
        yield packed_batch(pairs, 0, 300, attention="flex")


def _dense_from_mask_mod(owner, kind):
    from torch.nn.attention.flex_attention import create_mask

    rows, length = owner.shape
    return create_mask(flex.mask_mod(owner, kind), rows, 1, length, length, device="cpu")  # (R, 1, L, L)


def test_mask_mod_equals_dense_mask():
    for batch in _random_batches():
        dense = packed_mask(batch["owner"], batch["kind"])
        assert torch.equal(_dense_from_mask_mod(batch["owner"], batch["kind"]), dense)
        if "attention_mask" in batch:
            assert torch.equal(batch["attention_mask"], dense)


def test_block_tables_from_intervals_equal_the_dense_mask_tiles():
    """Which tiles hold an allowed entry / only allowed ones, read off the dense mask, against the interval count;
    and the BlockMask's own dense view equal to torch's create_block_mask (which evaluates every entry)."""
    from torch.nn.attention.flex_attention import create_block_mask

    for block in (16, 128):
        for batch in _random_batches():
            owner, kind = batch["owner"], batch["kind"]
            rows, length = owner.shape
            n = -(-length // block)
            dense = torch.zeros(rows, n * block, n * block, dtype=torch.bool)
            dense[:, :length, :length] = packed_mask(owner, kind)[:, 0]
            tiles = dense.view(rows, n, block, n, block).transpose(2, 3).flatten(-2)  # (R, nQ, nK, b·b)
            any_tile, full = flex.block_tables(owner, kind, block)
            assert torch.equal(any_tile, tiles.any(-1)) and torch.equal(full, tiles.all(-1))
            ours = flex.packed_block_mask(owner, kind, block)
            theirs = create_block_mask(flex.mask_mod(*_padded(owner, kind, n * block)), rows, None, length, length,
                                       device="cpu", BLOCK_SIZE=block)
            assert torch.equal(ours.to_dense(), theirs.to_dense())
            for name in ("kv_num_blocks", "full_kv_num_blocks", "q_num_blocks", "full_q_num_blocks"):
                assert torch.equal(getattr(ours, name), getattr(theirs, name)), name


def _padded(owner, kind, width):
    pad = width - owner.shape[-1]
    return (torch.nn.functional.pad(owner, (0, pad), value=-1), torch.nn.functional.pad(kind, (0, pad), value=3))


def test_packed_block_mask_builds_no_dense_mask():
    """A 16k-token row: the tables are (L/128)² entries, the interval count L·L/128; never L² (268M) of anything."""
    pairs = random_pairs(90, 7, longest=120)
    batch = packed_batch(pairs, 0, 16_384, attention="flex")
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1
    assert batch["real_tokens"] == batch["computed_tokens"]  # one row, no padding
    mask = flex.packed_block_mask(batch["owner"], batch["kind"])
    length = batch["input_ids"].shape[1]
    assert mask.shape == (1, 1, length, length)
    assert mask.kv_indices.numel() == (-(-length // 128)) ** 2
    assert mask.sparsity() > 90  # pairs do not see each other: most tiles are skipped


def _eager_flex(monkeypatch):
    """On CPU torch's FlexAttention has no backward; its unfused reference implementation (the higher-order op run
    eagerly) has, and takes the same BlockMask and mask_mod. The model's attention calls it instead."""
    import transformers.integrations.flex_attention as tf_flex
    from torch._higher_order_ops.flex_attention import flex_attention as flex_hop
    from torch.nn.attention.flex_attention import _apply_kernel_options

    def eager(query, key, value, training=False, score_mod=None, block_mask=None, scale=None, enable_gqa=True,
              kernel_options=None, **_):
        if enable_gqa and key.shape[1] != query.shape[1]:
            key = key.repeat_interleave(query.shape[1] // key.shape[1], 1)
            value = value.repeat_interleave(query.shape[1] // value.shape[1], 1)
        options = _apply_kernel_options(query, key, value, False, kernel_options, None)
        return flex_hop(query, key, value, score_mod, block_mask.as_tuple(), scale, options)[0]

    monkeypatch.setattr(tf_flex, "compile_friendly_flex_attention", eager)


def _logps_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    logps = batch_logps(model, batch)
    (logps * torch.linspace(-1.0, 1.0, logps.shape[0])).sum().backward()  # a different weight per sequence
    return logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_qwen2"])
def test_flex_equals_sdpa_logps_and_gradients(request, monkeypatch, arch):
    """fp32 on CPU: the flex layout (one row, BlockMask) against the SDPA layout (balanced rows, dense mask)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(request.getfixturevalue(arch), attn_implementation="sdpa")
    pairs = random_pairs(5, 11, longest=80)
    expected, expected_grads = _logps_and_grads(model, packed_batch(pairs, 0, 200, prompt_targets=True))
    if not torch.cuda.is_available():
        _eager_flex(monkeypatch)
    flex.use_attention(model, "flex")
    assert model.config._attn_implementation == "flex_attention"
    got, grads = _logps_and_grads(model, packed_batch(pairs, 0, 200, prompt_targets=True, attention="flex"))
    torch.testing.assert_close(got, expected, atol=0, rtol=1e-5)
    assert grads.keys() == expected_grads.keys()
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-5 * grad.abs().max().item(), rtol=1e-4, msg=name)


def test_compiled_flex_forward_on_cpu_equals_sdpa(tiny_llama):
    """The real compiled kernel (forward only on CPU: what a reference pass would run)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="sdpa").eval()
    pairs = random_pairs(5, 3, longest=120)
    with torch.no_grad():
        expected = batch_logps(model, packed_batch(pairs, 0, 300))
        flex.use_attention(model, "flex")
        got = batch_logps(model, packed_batch(pairs, 0, 300, attention="flex"))
    torch.testing.assert_close(got, expected, atol=0, rtol=1e-5)


def test_resolve_attention(tiny_llama, tiny_gpt2):
    from transformers import AutoModelForCausalLM

    from dpolab.errors import ConfigError

    llama = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="sdpa")
    gpt2 = AutoModelForCausalLM.from_pretrained(tiny_gpt2, attn_implementation="sdpa")
    assert flex.resolve_attention("auto", "packed", llama, "cuda") == "flex"
    assert flex.resolve_attention("auto", "packed", llama, "cpu") == "pairs"  # no flex backward on CPU
    assert flex.resolve_attention("auto", "padded", llama, "cuda") == "sdpa"
    assert flex.resolve_attention("auto", "packed", gpt2, "cuda") == "sdpa"  # transformers' GPT-2 has no flex
    assert flex.resolve_attention("sdpa", "packed", llama, "cuda") == "sdpa"
    with pytest.raises(ConfigError, match="GPT2LMHeadModel"):
        flex.resolve_attention("flex", "packed", gpt2, "cuda")
    with pytest.raises(ConfigError, match="backward on cpu"):
        flex.resolve_attention("flex", "packed", llama, "cpu")


def test_gpt2_packed_sdpa_from_flex_layout(tiny_gpt2):
    """A flex-laid batch (no dense mask) on an SDPA model: the dense mask is built from its segments."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2, attn_implementation="sdpa").eval()
    pairs = random_pairs(4, 5)
    with torch.no_grad():
        expected = batch_logps(model, packed_batch(pairs, 0, 100))
        got = batch_logps(model, packed_batch(pairs, 0, 100, attention="flex"))
    torch.testing.assert_close(got, expected, atol=0, rtol=1e-5)


def test_attention_config():
    from dpolab.config import TrainConfig, load_config
    from dpolab.errors import ConfigError

    assert TrainConfig().attention == "auto"
    assert load_config(TrainConfig, None, {"attention": "sdpa"}).attention == "sdpa"
    with pytest.raises(ConfigError, match="layout packed"):
        load_config(TrainConfig, None, {"attention": "flex", "layout": "padded"})
    with pytest.raises(ConfigError, match="attention"):
        load_config(TrainConfig, None, {"attention": "dense"})
