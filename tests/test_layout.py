"""Packed prefix-shared and padded layouts against an independent per-sequence computation (plain model logits)."""

import pytest
import torch

from dpolab.engine.layout import balance_rows, packed_batch, padded_batch
from dpolab.engine.logprobs import batch_logps


def _pairs(n=6, seed=1, vocab=900):
    g = torch.Generator().manual_seed(seed)
    mk = lambda k: torch.randint(10, vocab, (k,), generator=g).tolist()  # noqa: E731
    out = []
    for _ in range(n):
        p, c, r = (int(x) for x in torch.randint(2, 40, (3,), generator=g))
        out.append({"prompt_ids": mk(p), "chosen_ids": mk(c), "rejected_ids": mk(r)})
    return out


def _independent(model, prompt, response):
    ids = torch.tensor([prompt + response])
    logp = model(ids).logits[0, len(prompt) - 1 : -1].float().log_softmax(-1)
    return logp.gather(-1, torch.tensor(response)[:, None]).sum().item()


def _expected(model, pairs):
    return torch.tensor([_independent(model, p["prompt_ids"], p["chosen_ids"]) for p in pairs]
                        + [_independent(model, p["prompt_ids"], p["rejected_ids"]) for p in pairs])


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_gpt2"])
@pytest.mark.parametrize("budget", [64, 200, 10_000])
def test_layouts_equal_separate_sequences(request, arch, budget):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(request.getfixturevalue(arch), attn_implementation="sdpa").eval()
    pairs = _pairs()
    with torch.no_grad():
        expected = _expected(model, pairs)
        # Summed log-probs: relative tolerance (fp32 rounding grows with the sum, and differs between CPU kinds).
        torch.testing.assert_close(batch_logps(model, padded_batch(pairs, 0)), expected, atol=0, rtol=1e-6)
        torch.testing.assert_close(batch_logps(model, packed_batch(pairs, 0, budget)), expected, atol=0, rtol=1e-6)
        torch.testing.assert_close(batch_logps(model, padded_batch(pairs, 0), chunk=7), expected, atol=0, rtol=1e-6)


def test_eager_attention_is_refused_for_packed(tiny_llama):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="eager")
    with pytest.raises(ValueError, match="sdpa"):
        batch_logps(model, packed_batch(_pairs(2), 0, 100))


def test_packed_mask_structure():
    pair = {"prompt_ids": [1, 2], "chosen_ids": [3, 4], "rejected_ids": [5]}
    batch = packed_batch([pair, pair], pad_id=0, token_budget=100)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 1, 2, 3, 4, 5]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 2, 0, 1, 2, 3, 2]]
    mask = batch["attention_mask"][0, 0]
    assert mask[4].tolist() == [True, True, False, False, True] + [False] * 5  # rejected sees prompt + itself only
    assert mask[3].tolist() == [True, True, True, True, False] + [False] * 5  # chosen sees prompt + chosen
    assert not mask[5:, :5].any() and not mask[:5, 5:].any()  # pairs never see each other
    # kept positions 1, 2 (pair 0) and 6, 7 (pair 1): chosen 3, 4 from positions 1, 2; rejected 5 from the prompt's
    # last position 1, shared with chosen's first token
    assert batch["logits_to_keep"][0].nonzero().flatten().tolist() == [1, 2, 6, 7]
    assert batch["pred_index"].tolist() == [0, 1, 2, 3, 0, 2]
    assert batch["target_ids"].tolist() == [3, 4, 3, 4, 5, 5]
    assert batch["seq_index"].tolist() == [0, 0, 1, 1, 2, 3]
    assert batch["real_tokens"] == batch["computed_tokens"] == 10


def test_balanced_rows_and_padding_isolated():
    pairs = [{"prompt_ids": [1] * k, "chosen_ids": [2, 3], "rejected_ids": [4]} for k in (9, 2, 5, 3)]
    batch = packed_batch(pairs, pad_id=0, token_budget=20)
    # lengths 12, 5, 8, 6 = 31 tokens -> 2 rows; longest first onto the lightest: {12, 5} and {8, 6}
    assert batch["input_ids"].shape == (2, 17)
    assert batch["real_tokens"] == 31 and batch["computed_tokens"] == 34
    mask = batch["attention_mask"][:, 0]
    pad = batch["input_ids"] == 0
    assert all(mask[r, i].sum() == 1 and mask[r, i, i] for r, i in pad.nonzero().tolist())  # padding sees itself only


def test_balance_rows_keeps_everything():
    lengths = [50, 40, 30, 20, 10, 90, 5]
    rows = balance_rows(lengths, 100)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert len(rows) == 3
    loads = sorted(sum(lengths[i] for i in row) for row in rows)
    assert loads[-1] - loads[0] <= 40  # longest-first onto the lightest row



def test_balance_rows_finds_the_narrowest_widest_row():
    lengths = [385, 330, 88, 578, 238, 483, 403, 203]  # a real HH batch (qa, 512): LPT alone made rows of 816, 901, 991
    rows = balance_rows(lengths, 1024)
    assert len(rows) == 3
    assert sorted(sum(lengths[i] for i in row) for row in rows)[-1] == 914  # ⌈2708 / 3⌉ = 903: 914 is the optimum
    assert balance_rows(lengths, 1024) == rows  # deterministic
    lengths = [70, 72, 77, 84, 376, 391, 533, 538]  # two of the four long pairs must share a row: 376 + 391
    assert max(sum(lengths[i] for i in row) for row in balance_rows(lengths, 1024)) == 767


def test_hh_token_efficiency(hh_path, tokenizer):
    """Batches of 8 HH pairs in the trainer's order, the demo's template and max_length 512, the default budget
    2·512: sdpa rows keep ≥ 99% of computed tokens useful (longest-first onto the lightest row alone: 97.7%),
    the single row of flex and pairs 100%."""
    from dpolab.config import DataConfig
    from dpolab.data.prepare import build
    from dpolab.engine.trainer import SeededOrder

    train, _, _, _ = build(DataConfig(dataset=str(hh_path), template="qa", max_length=512), tokenizer)
    order = SeededOrder.order(len(train), 42)
    for attention, floor in (("sdpa", 0.99), ("flex", 1.0), ("pairs", 1.0)):
        real = computed = 0
        for start in range(0, len(order), 8):
            batch = packed_batch([train[i] for i in order[start : start + 8]], 0, 1024, attention=attention)
            real, computed = real + batch["real_tokens"], computed + batch["computed_tokens"]
        assert real / computed >= floor, (attention, real / computed)

@pytest.mark.slow
def test_real_smollm2_packed_equals_separate_sequences_on_hh(embedded_dir, hh_path, tokenizer):
    """The embedded 135M model (30 layers, real weights) on real HH pairs: packed == padded == separate."""
    from transformers import AutoModelForCausalLM

    from dpolab.config import DataConfig
    from dpolab.data.prepare import build

    model = AutoModelForCausalLM.from_pretrained(embedded_dir, attn_implementation="sdpa").eval()
    train, _, _, _ = build(DataConfig(dataset=str(hh_path), template="raw", limit=40, test_size=0.0), tokenizer)
    pairs = [r for r in train if len(r["prompt_ids"]) < 200][:4]
    with torch.no_grad():
        expected = _expected(model, pairs)
        packed = batch_logps(model, packed_batch(pairs, tokenizer.pad_token_id, 1024))
        padded = batch_logps(model, padded_batch(pairs, tokenizer.pad_token_id))
    # Sums of 55-220 nats in fp32 over 30 layers: only relative tolerances hold on every CPU kind. Packed vs padded
    # differ by fp32 rounding of another reduction order: 7.6e-5 nats on an AVX512-BF16 EPYC, 1.07e-4 (5e-7
    # relative) on an AVX2 one; both vs the plain full-logits log_softmax up to 7.6e-4 nats (< 5e-6 relative).
    torch.testing.assert_close(packed, padded, atol=0, rtol=2e-6)
    torch.testing.assert_close(packed, expected, atol=0, rtol=1e-5)
    torch.testing.assert_close(padded, expected, atol=0, rtol=1e-5)


def _grads_and_logps(model, batch, chunk):
    model.zero_grad(set_to_none=True)
    logps = batch_logps(model, batch, chunk=chunk)
    (logps * torch.linspace(-1.0, 1.0, logps.shape[0])).sum().backward()  # a different weight per sequence
    return logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_gpt2"])
@pytest.mark.parametrize("keep", [0, 2**62], ids=["recompute", "keep"])
def test_fused_head_equals_logits_path(request, monkeypatch, arch, keep):
    """head_logps (hidden states + chunked log-sum-exp with its own backward) against the plain logits path:
    the same log-probs and the same gradient for every parameter, the tied/untied head included."""
    from transformers import AutoModelForCausalLM

    from dpolab.engine import logprobs

    model = AutoModelForCausalLM.from_pretrained(request.getfixturevalue(arch), attn_implementation="sdpa").eval()
    assert logprobs.fused_head(model) is not None
    for batch in (padded_batch(_pairs(), 0), packed_batch(_pairs(), 0, 200, prompt_targets=True)):
        monkeypatch.setattr(logprobs, "KEEP_LOGITS_BYTES", keep)
        fused, fused_grads = _grads_and_logps(model, batch, chunk=7)
        whole, whole_grads = _grads_and_logps(model, batch, chunk=10**6)  # one chunk
        monkeypatch.setattr(logprobs, "fused_head", lambda model: None)
        plain, plain_grads = _grads_and_logps(model, batch, chunk=7)
        monkeypatch.undo()
        for got, got_grads in ((fused, fused_grads), (whole, whole_grads)):
            torch.testing.assert_close(got, plain, atol=0, rtol=1e-6)
            assert got_grads.keys() == plain_grads.keys()
            for name, grad in plain_grads.items():
                # 1e-5 of the largest entry: the fused backward sums the target and softmax terms in one matmul, a
                # different fp32 order than autograd's log_softmax (differences up to ~6e-6 of the largest, tied rows)
                torch.testing.assert_close(got_grads[name], grad, atol=1e-5 * grad.abs().max().item(), rtol=1e-4,
                                           msg=name)


def test_head_logps_with_bias_against_log_softmax():
    from dpolab.engine.logprobs import head_logps

    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(5, 4, generator=g, requires_grad=True)
    weight = torch.randn(11, 4, generator=g, requires_grad=True)
    bias = torch.randn(11, generator=g, requires_grad=True)
    pred, target = torch.tensor([0, 1, 1, 4]), torch.tensor([3, 0, 10, 7])
    expected = torch.nn.functional.linear(hidden, weight, bias).log_softmax(-1)[pred, target]
    e_grads = torch.autograd.grad(expected.sum(), (hidden, weight, bias))
    for keep, chunk in ((False, 2), (True, 2), (False, 8), (True, 8)):  # several chunks, and one (kept as is)
        got = head_logps(hidden, weight, bias, pred, target, chunk=chunk, keep=keep)
        torch.testing.assert_close(got, expected)
        for a, b in zip(torch.autograd.grad(got.sum(), (hidden, weight, bias)), e_grads, strict=True):
            torch.testing.assert_close(a, b)


def test_heads_with_post_processing_take_the_logits_path(tiny_llama):
    from transformers import AutoModelForCausalLM

    from dpolab.engine.logprobs import fused_head

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    model.config.final_logit_softcapping = 30.0  # logits = cap·tanh(head(h)/cap): not a plain head
    assert fused_head(model) is None
    model.config.final_logit_softcapping = None
    model.config.logit_scale = 0.5
    assert fused_head(model) is None
