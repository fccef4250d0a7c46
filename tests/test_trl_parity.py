"""The engine against the oracle: TRL 1.16's DPOTrainer on the same tiny model, batch, beta and loss (fp32), for
every DPO loss type, at a point where the policy differs from the reference (perturbed weights), in both layouts.

Per pair (one-pair batches on both sides): the loss, the reported rewards and the log-probs. Per batch: the loss and
every parameter's gradient."""

import pytest
import torch

from dpolab.engine.layout import packed_batch, padded_batch
from dpolab.engine.logprobs import batch_logps, ld_weights
from dpolab.engine.methods import MethodSettings, preference_step

PAIRS = [
    {"prompt": "Q: How do I boil an egg?\nA:", "chosen": " Simmer it for nine minutes, then cool it in ice water.", "rejected": " No idea."},
    {"prompt": "Q: Name a primary colour.\nA:", "chosen": " Blue.", "rejected": " Seven, obviously, everyone knows that."},
    {"prompt": "Q: Is it safe to mix bleach and ammonia?\nA:", "chosen": " No: it releases toxic chloramine gas.", "rejected": " Sure."},
    {"prompt": "Q: Say hi.\nA:", "chosen": " Hi!", "rejected": " Go away."},
]

# (loss types, extra DPOConfig options): every TRL 1.16 loss type, MPO's weighted combination, and LD-DPO.
CASES = [("sigmoid", {}), ("hinge", {}), ("ipo", {}), ("exo_pair", {"label_smoothing": 1e-3}), ("nca_pair", {}),
         ("robust", {"label_smoothing": 0.1}), ("bco_pair", {}), ("sppo_hard", {}), ("aot", {"label_smoothing": 0.05}),
         ("aot_unpaired", {}), ("apo_zero", {}), ("apo_down", {}), ("discopop", {"discopop_tau": 0.05}), ("sft", {}),
         ("sigmoid_norm", {}), (("sigmoid", "bco_pair", "sft"), {"loss_weights": [0.8, 0.2, 1.0]}),
         ("sigmoid", {"ld_alpha": 0.5}), (("ipo", "sft"), {"ld_alpha": 0.3, "loss_weights": [1.0, 0.5]})]


def perturbed(model_dir, seed=0, scale=0.05):
    """The policy a few steps away from the reference: every weight moved by seeded noise."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * scale)
    return model


def _trl_trainer(model_dir, tmp_path, loss_types, options):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer as TRLTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    args = DPOConfig(output_dir=str(tmp_path / "trl"), bf16=False, use_cpu=True, beta=0.1, loss_type=list(loss_types),
                     per_device_train_batch_size=len(PAIRS), report_to="none", max_length=None,
                     precompute_ref_log_probs=False, dataloader_num_workers=0, **options)
    ref = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa")
    return TRLTrainer(model=perturbed(model_dir), ref_model=ref, args=args, train_dataset=Dataset.from_list(PAIRS),
                      processing_class=tokenizer)


def _trl_per_pair(trl, tokenized):
    """TRL's loss, rewards and log-probs of each pair alone (its metrics are batch means)."""
    rows = []
    for t in tokenized:
        trl._metrics["train"].clear()
        with torch.no_grad():
            loss = trl._compute_loss(trl.model, trl.data_collator([t]), return_outputs=False)
        m = trl._metrics["train"]
        rows.append([loss.item()] + [m[k][-1] for k in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected")])
    return torch.tensor(rows, dtype=torch.float64)


def _our_batch(pairs, layout, ref_model, ld_alpha, prompt_targets=False):
    batch = packed_batch(pairs, 0, 64, prompt_targets) if layout == "packed" else padded_batch(pairs, 0, prompt_targets)
    chosen_tokens = torch.tensor([len(p["chosen_ids"]) for p in pairs], dtype=torch.float)
    rejected_tokens = torch.tensor([len(p["rejected_ids"]) for p in pairs], dtype=torch.float)
    batch.update(chosen_tokens=chosen_tokens, rejected_tokens=rejected_tokens)
    if ld_alpha is not None:
        batch["token_weights"] = ld_weights(batch["seq_index"], chosen_tokens, rejected_tokens, ld_alpha)
    with torch.no_grad():
        ref = batch_logps(ref_model, batch)  # (2B,) the reference: the unperturbed model
    batch.update(ref_chosen=ref[: len(pairs)], ref_rejected=ref[len(pairs):])
    return batch


def _settings(loss_types, options):
    return MethodSettings(beta=0.1, loss_type=loss_types, label_smoothing=options.get("label_smoothing", 0.0),
                          loss_weights=tuple(options["loss_weights"]) if "loss_weights" in options else None,
                          discopop_tau=options.get("discopop_tau", 0.05))


def _our_per_pair(policy, ref_model, pairs, layout, settings, ld_alpha):
    rows = []
    for pair in pairs:
        with torch.no_grad():
            loss, m = preference_step(policy, _our_batch([pair], layout, ref_model, ld_alpha), settings)
        rows.append([loss.item()] + [m[k].item() for k in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected")])
    return torch.tensor(rows, dtype=torch.float64)


def _assert_gradients_equal(ours, theirs):
    trl_grads = dict(theirs.named_parameters())
    for name, param in ours.named_parameters():
        other = trl_grads[name].grad
        assert param.grad is not None and other is not None, name
        # fp32 gradients summed over another reduction order: 1e-5 absolute at the gradient's own scale
        scale = max(1.0, other.abs().max().item())
        diff = (param.grad - other).abs().max().item()
        assert diff <= 1e-5 * scale, f"{name}: max |Δgrad| {diff:.3g} at gradient scale {scale:.3g}"
    assert len(list(ours.parameters())) == len(trl_grads)


@pytest.mark.parametrize("loss_types,options", CASES, ids=lambda v: ",".join(v) if isinstance(v, tuple) else None)
def test_losses_rewards_and_gradients_match_trl(tiny_llama, tmp_path, loss_types, options):
    from transformers import AutoModelForCausalLM

    loss_types = (loss_types,) if isinstance(loss_types, str) else loss_types
    trl = _trl_trainer(tiny_llama, tmp_path, loss_types, options)
    trl.model.train()
    tokenized = [{k: trl.train_dataset[i][k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for i in range(len(PAIRS))]
    expected = _trl_per_pair(trl, tokenized)
    trl.model.zero_grad()
    trl_loss = trl._compute_loss(trl.model, trl.data_collator(tokenized), return_outputs=False)
    trl_loss.backward()

    ref_model = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="sdpa").eval()
    settings, ld_alpha = _settings(loss_types, options), options.get("ld_alpha")
    assert expected[:, 0].std() > 0 or "sft" in loss_types  # the pairs sit at different points of the loss
    for layout in ("padded", "packed"):
        policy = perturbed(tiny_llama).train()
        got = _our_per_pair(policy, ref_model, tokenized, layout, settings, ld_alpha)
        # columns: loss, rewards chosen/rejected, logps chosen/rejected (sums of tens of nats: relative tolerance)
        torch.testing.assert_close(got[:, :3], expected[:, :3], atol=1e-5, rtol=1e-5, msg=layout)
        torch.testing.assert_close(got[:, 3:], expected[:, 3:], atol=0, rtol=1e-6, msg=layout)
        loss, _ = preference_step(policy, _our_batch(tokenized, layout, ref_model, ld_alpha), settings)
        loss.backward()
        # 1e-5, relative once the loss is above 1 (sppo_hard's squares reach ~50 here)
        assert abs(loss.item() - trl_loss.item()) <= 1e-5 * max(1.0, abs(trl_loss.item())), (layout, loss.item(), trl_loss.item())
        _assert_gradients_equal(policy, trl.model)


def test_perturbation_moves_the_policy_away_from_the_reference(tiny_llama):
    from transformers import AutoModelForCausalLM

    ref_model = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="sdpa").eval()
    pairs = [{"prompt_ids": [5, 6, 7], "chosen_ids": [8, 9], "rejected_ids": [10, 11, 12]}]
    batch = _our_batch(pairs, "packed", ref_model, None)
    with torch.no_grad():
        moved = batch_logps(perturbed(tiny_llama), batch)
    assert (moved - torch.cat([batch["ref_chosen"], batch["ref_rejected"]])).abs().min() > 0.05


# ------------------------------------------------------------------------- reference-free: CPO, SimPO, ORPO
RF_CASES = [("cpo", {"loss_type": "sigmoid", "cpo_alpha": 1.0}, {}),
            ("cpo", {"loss_type": "sigmoid", "cpo_alpha": 0.5, "label_smoothing": 0.1}, {"cpo_alpha": 0.5, "label_smoothing": 0.1}),
            ("simpo", {"loss_type": "simpo", "cpo_alpha": 0.0, "simpo_gamma": 0.5}, {}),
            ("simpo", {"loss_type": "simpo", "cpo_alpha": 1.0, "simpo_gamma": 1.0}, {"cpo_alpha": 1.0, "simpo_gamma": 1.0}),
            ("simpo", {"loss_type": "alphapo", "alpha": 0.25, "simpo_gamma": 0.5}, {"alphapo_alpha": 0.25}),
            ("orpo", {}, {})]


def _trl_reference_free(model_dir, tmp_path, method, options):
    from datasets import Dataset
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    common = dict(output_dir=str(tmp_path / method), bf16=False, use_cpu=True, beta=0.1, report_to="none",
                  per_device_train_batch_size=len(PAIRS), dataloader_num_workers=0, max_length=512)
    if method == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        trainer_cls, args = ORPOTrainer, ORPOConfig(**common, **options)
    else:
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        trainer_cls, args = CPOTrainer, CPOConfig(**common, **options)
    return trainer_cls(model=perturbed(model_dir), args=args, train_dataset=Dataset.from_list(PAIRS),
                       processing_class=tokenizer)


def _as_pair(row) -> dict:
    """TRL's tokenized row as dpolab's (prompt, chosen, rejected) ids: the same sequences, split where labels start."""
    n_prompt = sum(1 for label in row["chosen_labels"] if label == -100)
    pair = {"prompt_ids": row["chosen_input_ids"][:n_prompt], "chosen_ids": row["chosen_input_ids"][n_prompt:],
            "rejected_ids": row["rejected_input_ids"][n_prompt:]}
    assert row["rejected_input_ids"][:n_prompt] == pair["prompt_ids"]
    return pair


@pytest.mark.parametrize("method,trl_options,our_options", RF_CASES, ids=lambda v: v if isinstance(v, str) else "")
def test_reference_free_methods_match_trl(tiny_llama, tmp_path, method, trl_options, our_options):
    trl = _trl_reference_free(tiny_llama, tmp_path, method, trl_options)
    trl.model.train()
    rows = [trl.train_dataset[i] for i in range(len(PAIRS))]
    expected = []
    for row in rows:
        with torch.no_grad():
            loss, m = trl.get_batch_loss_metrics(trl.model, trl.data_collator([row]))
        expected.append([loss.item(), m["rewards/chosen"], m["rewards/rejected"]])
    expected = torch.tensor(expected, dtype=torch.float64)
    trl.model.zero_grad()
    trl_loss, _ = trl.get_batch_loss_metrics(trl.model, trl.data_collator(rows))
    trl_loss.backward()

    pairs = [_as_pair(row) for row in rows]
    settings = MethodSettings(beta=0.1, method=method, simpo_gamma=our_options.get("simpo_gamma", 0.5),
                              alphapo_alpha=our_options.get("alphapo_alpha", 0.0),
                              cpo_alpha=our_options.get("cpo_alpha", 1.0 if method == "cpo" else 0.0),
                              label_smoothing=our_options.get("label_smoothing", 0.0))
    for layout in ("padded", "packed"):
        policy = perturbed(tiny_llama).train()
        got = []
        for pair in pairs:
            with torch.no_grad():
                loss, m = preference_step(policy, _our_batch([pair], layout, policy, None, method == "orpo"), settings)
            got.append([loss.item(), m["rewards/chosen"].item(), m["rewards/rejected"].item()])
        torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), expected, atol=1e-5, rtol=1e-5, msg=lambda m: f"{layout}: {m}")
        loss, _ = preference_step(policy, _our_batch(pairs, layout, policy, None, method == "orpo"), settings)
        loss.backward()
        assert abs(loss.item() - trl_loss.item()) <= 1e-5 * max(1.0, abs(trl_loss.item())), layout
        _assert_gradients_equal(policy, trl.model)


# ------------------------------------------------------------------------- KTO on unpaired examples
EXAMPLES = [{"prompt": p["prompt"], "completion": p[key], "label": key == "chosen"}
            for p in PAIRS for key in ("chosen", "rejected")][:6]


def _trl_kto(model_dir, tmp_path):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import KTOConfig, KTOTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    args = KTOConfig(output_dir=str(tmp_path / "kto"), bf16=False, use_cpu=True, beta=0.1, desirable_weight=1.3,
                     undesirable_weight=0.7, per_device_train_batch_size=len(EXAMPLES), report_to="none",
                     precompute_ref_log_probs=False, dataloader_num_workers=0)
    ref = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa")
    return KTOTrainer(model=perturbed(model_dir), ref_model=ref, args=args, train_dataset=Dataset.from_list(EXAMPLES),
                      processing_class=tokenizer)


def test_kto_matches_trl(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    trl = _trl_kto(tiny_llama, tmp_path)
    trl.model.train()
    keys = ("prompt_ids", "completion_ids", "KL_completion_ids", "label")
    rows = [{k: trl.train_dataset[i][k] for k in keys} for i in range(len(EXAMPLES))]
    expected = []
    for row in rows:
        trl._metrics["train"].clear()
        with torch.no_grad():
            loss = trl._compute_loss(trl.model, trl.data_collator([row]), return_outputs=False)
        reward = trl._metrics["train"]["rewards/chosen" if row["label"] else "rewards/rejected"][-1]
        expected.append([loss.item(), reward])
    trl.model.zero_grad()
    trl_loss = trl._compute_loss(trl.model, trl.data_collator(rows), return_outputs=False)
    trl_loss.backward()

    # dpolab's unpaired record: (prompt, completion, KL completion) in the pair slots, plus the label.
    examples = [{"prompt_ids": r["prompt_ids"], "chosen_ids": r["completion_ids"], "rejected_ids": r["KL_completion_ids"],
                 "label": r["label"]} for r in rows]
    assert any(r["label"] for r in rows) and not all(r["label"] for r in rows)
    ref_model = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="sdpa").eval()
    settings = MethodSettings(beta=0.1, method="kto", desirable_weight=1.3, undesirable_weight=0.7)

    def batch_of(items, layout):
        batch = _our_batch(items, layout, ref_model, None)
        batch["labels"] = torch.tensor([bool(x["label"]) for x in items])
        return batch

    for layout in ("padded", "packed"):
        policy = perturbed(tiny_llama).train()
        got = []
        for example in examples:
            with torch.no_grad():
                loss, m = preference_step(policy, batch_of([example], layout), settings)
            got.append([loss.item(), m["rewards/chosen" if example["label"] else "rewards/rejected"].item()])
        torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64),
                                   atol=1e-5, rtol=1e-5, msg=lambda m: f"{layout}: {m}")
        loss, _ = preference_step(policy, batch_of(examples, layout), settings)
        loss.backward()
        assert abs(loss.item() - trl_loss.item()) <= 1e-5 * max(1.0, abs(trl_loss.item())), layout
        _assert_gradients_equal(policy, trl.model)


# ------------------------------------------------------------------------- reward model (Bradley–Terry)
# (RewardConfig options, per-pair margins or None): plain, TRL's `margin` column, centring, both.
REWARD_CASES = [({}, None), ({}, [0.5, 0.0, 1.0, -0.25]), ({"center_rewards_coefficient": 0.01}, None),
                ({"center_rewards_coefficient": 0.01}, [0.5, 0.0, 1.0, -0.25])]


def _trl_reward(model_dir, tmp_path, options, margins):
    import copy

    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, attn_implementation="sdpa")
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # away from the initialization, the score head included
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    ours = copy.deepcopy(model)
    rows = [dict(p, margin=m) for p, m in zip(PAIRS, margins)] if margins else PAIRS
    args = RewardConfig(output_dir=str(tmp_path / "reward"), bf16=False, use_cpu=True, report_to="none",
                        per_device_train_batch_size=len(PAIRS), dataloader_num_workers=0, max_length=None, **options)
    trl = RewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                        processing_class=AutoTokenizer.from_pretrained(model_dir))
    ours.config.pad_token_id = trl.processing_class.pad_token_id  # as dpolab's loader sets it
    return trl, ours


def _split_prompt(chosen_ids: list[int], rejected_ids: list[int]) -> dict:
    """TRL tokenizes prompt+response whole; dpolab's pair is (prompt, chosen, rejected): the common prefix is the
    prompt, leaving each response at least one token. The sequences are the same either way."""
    n = 0
    while n < min(len(chosen_ids), len(rejected_ids)) - 1 and chosen_ids[n] == rejected_ids[n]:
        n += 1
    return {"prompt_ids": chosen_ids[:n], "chosen_ids": chosen_ids[n:], "rejected_ids": rejected_ids[n:]}


def _reward_batch(pairs, layout, pad_id, margins):
    batch = packed_batch(pairs, pad_id, 64) if layout == "packed" else padded_batch(pairs, pad_id)
    if margins is not None:
        batch["margin"] = torch.tensor(margins, dtype=torch.float32)
    return batch


@pytest.mark.parametrize("options,margins", REWARD_CASES, ids=["plain", "margin", "centred", "centred+margin"])
def test_reward_model_matches_trl(tiny_llama, tmp_path, options, margins):
    trl, ours_init = _trl_reward(tiny_llama, tmp_path, options, margins)
    trl.model.train()
    rows = [trl.train_dataset[i] for i in range(len(PAIRS))]
    keys = ("chosen_ids", "rejected_ids") + (("margin",) if margins else ())
    tokenized = [{k: row[k] for k in keys} for row in rows]
    assert all(t["chosen_ids"][-1] == trl.processing_class.eos_token_id for t in tokenized)  # EOS = pad: pooled before it
    expected = []
    for t in tokenized:
        trl._metrics["train"].clear()
        with torch.no_grad():
            loss = trl.compute_loss(trl.model, trl.data_collator([t]))
        expected.append([loss.item(), trl._metrics["train"]["margin"][-1], trl._metrics["train"]["mean_reward"][-1]])
    expected = torch.tensor(expected, dtype=torch.float64)
    assert expected[:, 1].abs().min() > 1e-3 and expected[:, 0].std() > 0  # scores that differ: a live score head
    trl.model.zero_grad()
    trl_loss = trl.compute_loss(trl.model, trl.data_collator(tokenized))
    trl_loss.backward()

    pairs = [_split_prompt(t["chosen_ids"], t["rejected_ids"]) for t in tokenized]
    settings = MethodSettings(beta=0.1, method="reward",
                              center_rewards_coefficient=options.get("center_rewards_coefficient"))
    pad_id = trl.processing_class.pad_token_id
    for layout in ("padded", "packed"):
        import copy

        model = copy.deepcopy(ours_init).train()
        got = []
        for i, pair in enumerate(pairs):
            with torch.no_grad():
                loss, m = preference_step(model, _reward_batch([pair], layout, pad_id, margins and margins[i:i + 1]),
                                          settings)
            got.append([loss.item(), m["margin"].item(), m["mean_reward"].item()])
        torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), expected, atol=1e-5, rtol=1e-5,
                                   msg=lambda msg: f"{layout}: {msg}")
        loss, _ = preference_step(model, _reward_batch(pairs, layout, pad_id, margins), settings)
        loss.backward()
        assert abs(loss.item() - trl_loss.item()) <= 1e-5 * max(1.0, abs(trl_loss.item())), layout
        _assert_gradients_equal(model, trl.model)
        assert model.score.weight.grad.abs().max() > 0
