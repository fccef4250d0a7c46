"""The engine against the oracle: TRL 1.x DPOTrainer on the same tiny model, batch, beta and loss (fp32)."""

import pytest
import torch

from dpolab.engine.layout import packed_batch, padded_batch
from dpolab.engine.logprobs import batch_logps
from dpolab.engine.trainer import DPOSettings, dpo_step

PAIRS = [
    {"prompt": "Q: How do I boil an egg?\nA:", "chosen": " Simmer it for nine minutes, then cool it in ice water.", "rejected": " No idea."},
    {"prompt": "Q: Name a primary colour.\nA:", "chosen": " Blue.", "rejected": " Seven, obviously, everyone knows that."},
    {"prompt": "Q: Is it safe to mix bleach and ammonia?\nA:", "chosen": " No: it releases toxic chloramine gas.", "rejected": " Sure."},
    {"prompt": "Q: Say hi.\nA:", "chosen": " Hi!", "rejected": " Go away."},
]


def _trl_trainer(model_dir, tmp_path, loss_type):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer as TRLTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    args = DPOConfig(output_dir=str(tmp_path / "trl"), bf16=False, use_cpu=True, beta=0.1, loss_type=[loss_type],
                     per_device_train_batch_size=len(PAIRS), report_to="none", max_length=None,
                     precompute_ref_log_probs=False, dataloader_num_workers=0)
    policy = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa")
    ref = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa")
    return TRLTrainer(model=policy, ref_model=ref, args=args, train_dataset=Dataset.from_list(PAIRS),
                      processing_class=tokenizer)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_logps_loss_and_gradients_match_trl(tiny_llama, tmp_path, loss_type, layout):
    from transformers import AutoModelForCausalLM

    trl = _trl_trainer(tiny_llama, tmp_path, loss_type)
    trl.model.train()
    tokenized = [trl.train_dataset[i] for i in range(len(PAIRS))]  # TRL's own token ids, so both see identical input
    collate = trl.data_collator
    trl_batch = collate([{k: t[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for t in tokenized])

    # TRL: per-sequence log-probs one pair at a time (its metrics are batch means), then loss and grads on the batch.
    trl_chosen, trl_rejected = [], []
    for t in tokenized:
        trl._metrics["train"].clear()
        single = collate([{k: t[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}])
        with torch.no_grad():
            trl._compute_loss(trl.model, single, return_outputs=False)
        trl_chosen.append(trl._metrics["train"]["logps/chosen"][-1])
        trl_rejected.append(trl._metrics["train"]["logps/rejected"][-1])
    trl.model.zero_grad()
    trl_loss = trl._compute_loss(trl.model, trl_batch, return_outputs=False)
    trl_loss.backward()

    ours_model = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="sdpa")
    pairs = [{k: t[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for t in tokenized]
    with torch.no_grad():
        layout_fn = (lambda p: packed_batch(p, 0, 64)) if layout == "packed" else (lambda p: padded_batch(p, 0))
        ref = batch_logps(ours_model, layout_fn(pairs))  # the starting policy is the reference
    batch = layout_fn(pairs)
    batch.update(ref_chosen=ref[: len(pairs)], ref_rejected=ref[len(pairs):],
                 chosen_tokens=torch.tensor([len(p["chosen_ids"]) for p in pairs], dtype=torch.float),
                 rejected_tokens=torch.tensor([len(p["rejected_ids"]) for p in pairs], dtype=torch.float))
    loss, metrics = dpo_step(ours_model, batch, DPOSettings(beta=0.1, loss_type=loss_type))
    loss.backward()

    torch.testing.assert_close(metrics["logps/chosen"], torch.tensor(trl_chosen), atol=1e-5, rtol=0)
    torch.testing.assert_close(metrics["logps/rejected"], torch.tensor(trl_rejected), atol=1e-5, rtol=0)
    assert abs(loss.item() - trl_loss.item()) < 1e-5
    trl_grads = dict(trl.model.named_parameters())
    compared = 0
    for name, param in ours_model.named_parameters():
        other = trl_grads[name].grad
        assert param.grad is not None and other is not None, name
        torch.testing.assert_close(param.grad, other, atol=1e-5, rtol=1e-4, msg=name)
        compared += 1
    assert compared == len(trl_grads)
