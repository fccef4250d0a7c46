"""Batch layouts. Both give the model inputs plus a gather plan: which kept position predicts which target token.

padded: chosen and rejected as 2B separate right-padded rows (the layout TRL uses), causal attention.
packed: each pair once as `prompt · chosen · rejected`. Position ids restart at 0 for each pair and continue from
        the prompt for *both* responses; the mask lets chosen see prompt+chosen, rejected see prompt+rejected (never
        chosen), and no pair see another. The first rejected token is predicted from the prompt's last position,
        like the first chosen one. The segments (`owner` pair index, `kind` prompt/chosen/rejected/pad, (R, L))
        define the mask; how it reaches the model depends on the attention (engine/flex.py decides which):
        sdpa: R = ⌈tokens/budget⌉ rows with the widest as narrow as it gets (`balance_rows`), padded to it, and a
              dense (R, 1, L, L) boolean mask — attention costs R·L², so rows stay about `budget` long.
        flex: all pairs in one row, no padding; the model builds a FlexAttention BlockMask from the segments, whose
              tiles where pairs do not meet are skipped, so the row's length costs nothing there.
        pairs: the same one row; SDPA runs pair by pair, each over its own span (engine/pair_attention.py).
Token efficiency (unique tokens / computed tokens) on the HH train split (1,793 pairs, max_length 512, batches of 8
pairs in the trainer's seeded order): padded computes 3.6x the unique tokens; packed sdpa with the default budget
1024 keeps 99.2% useful (qa and raw templates; longest-first onto the lightest row alone kept 97.7%, first-fit rows
77%), with budget 512 90% (pairs of up to ~1,000 tokens over ~4 rows); packed flex and pairs 100%. What sdpa still
pads is the optimum for its R (e.g. pairs of 538, 533, 391, 376, … tokens over 3 rows: two of the four share one).
One forward per step, so the same path runs under DDP/FSDP/DeepSpeed (they need every forward to go through the
wrapped model).
Both also give `score_index` (2B,): where a reward model reads each sequence's score (chosen 0..B-1, then rejected),
as flat indices into (rows·width). It is the sequence's last token that is not `pad_id`, the position
`AutoModelForSequenceClassification` pools at (the rightmost non-pad token), so a saved reward model scores a text
exactly as it was trained to. With pad = EOS (SmolLM2) that is the token before the response's EOS, as in TRL.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

PROMPT, CHOSEN, REJECTED, PAD = 0, 1, 2, 3


def _finish(n_pairs: int, width: int, keep: torch.Tensor, entries: list[tuple[int, int, list[int], int, int]]) -> dict:
    """entries: (seq index, row, target ids, position predicting the first target, position of the next ones).

    `keep` (R, L) marks the positions whose logits are needed; the model returns them flattened row-major, so a
    (row, position) maps to its rank among kept positions.
    """
    rank = torch.full(keep.shape, -1, dtype=torch.long)
    rank[keep] = torch.arange(int(keep.sum()))
    pred, target, seq = [], [], []
    for seq_index, row, ids, first, following in sorted(entries):
        positions = [first] + [following + k for k in range(len(ids) - 1)]
        pred.extend(rank[row, positions].tolist())
        target.extend(ids)
        seq.extend([seq_index] * len(ids))
    return {"logits_to_keep": keep, "pred_index": torch.tensor(pred, dtype=torch.long),
            "target_ids": torch.tensor(target, dtype=torch.long), "seq_index": torch.tensor(seq, dtype=torch.long),
            "n_seqs": max((e[0] for e in entries), default=2 * n_pairs - 1) + 1}


def last_real(ids: Sequence[int], pad_id: int) -> int:
    """Index of the last token of `ids` that is not `pad_id`; -1 when there is none."""
    return next((i for i in range(len(ids) - 1, -1, -1) if ids[i] != pad_id), -1)


def padded_batch(pairs: Sequence[dict[str, Any]], pad_id: int, prompt_targets: bool = False) -> dict[str, Any]:
    """`prompt_targets`: also gather the prompt's own tokens (from its second on) as sequences 2B..3B-1, for a
    loss that counts them (TRL's ORPO NLL runs over prompt and response)."""
    n = len(pairs)
    sequences = [p["prompt_ids"] + p["chosen_ids"] for p in pairs] + [p["prompt_ids"] + p["rejected_ids"] for p in pairs]
    width = max(map(len, sequences))
    input_ids = torch.full((2 * n, width), pad_id, dtype=torch.long)  # (2B, T)
    attention_mask = torch.zeros((2 * n, width), dtype=torch.long)  # (2B, T)
    keep = torch.zeros((2 * n, width), dtype=torch.bool)  # (2B, T)
    entries, score_index = [], []
    for row, seq in enumerate(sequences):
        score_index.append(row * width + max(last_real(seq, pad_id), 0))  # no real token: 0, as transformers'
        input_ids[row, : len(seq)] = torch.tensor(seq)
        attention_mask[row, : len(seq)] = 1
        pair = pairs[row % n]
        response = pair["chosen_ids"] if row < n else pair["rejected_ids"]
        start = len(pair["prompt_ids"]) - 1  # the position predicting the first response token
        keep[row, start : start + len(response)] = True
        entries.append((row, row, response, start, start + 1))
        if prompt_targets and row < n and len(pair["prompt_ids"]) > 1:
            keep[row, : start] = True
            entries.append((2 * n + row, row, pair["prompt_ids"][1:], 0, 1))
    return {"input_ids": input_ids, "attention_mask": attention_mask, "real_tokens": int(attention_mask.sum()),
            "computed_tokens": input_ids.numel(), "score_index": torch.tensor(score_index, dtype=torch.long),
            **_finish(n, width, keep, entries)}


def balance_rows(lengths: Sequence[int], budget: int, search: int = 20_000) -> list[list[int]]:
    """Pair indices spread over R = ⌈Σ lengths / budget⌉ rows with the widest row as narrow as it gets: longest
    first onto the lightest row (LPT scheduling), then a depth-first search over assignments (longest first, rows
    of equal load tried once, branches that cannot beat the best cut) for at most `search` steps, stopping at the
    bound max(⌈Σ/R⌉, longest pair). Deterministic: the same lengths give the same rows."""
    n_rows = max(1, min(len(lengths), math.ceil(sum(lengths) / budget)))
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    loads = [0] * n_rows
    assign = []
    for index in order:
        assign.append(loads.index(min(loads)))
        loads[assign[-1]] += lengths[index]
    best = _narrowest(order, lengths, n_rows, (max(loads), assign), search)[1]
    rows: list[list[int]] = [[] for _ in range(n_rows)]
    for index, row in zip(order, best, strict=True):
        rows[row].append(index)
    return [sorted(row) for row in rows if row]


def _narrowest(order: list[int], lengths: Sequence[int], n_rows: int, best: tuple[int, list[int]], steps: int
               ) -> tuple[int, list[int]]:
    """(widest row, row of each pair in `order`): `best` or an assignment found narrower within `steps` steps."""
    bound = max(math.ceil(sum(lengths) / n_rows), max(lengths, default=0))
    loads, assign, left = [0] * n_rows, [], [steps]

    def place(k: int) -> None:
        nonlocal best
        if left[0] <= 0 or best[0] <= bound:
            return
        left[0] -= 1
        if k == len(order):
            best = (max(loads), list(assign))
            return
        tried = set()
        for row in range(n_rows):
            if loads[row] in tried or loads[row] + lengths[order[k]] >= best[0]:
                continue
            tried.add(loads[row])  # rows of equal load are interchangeable
            loads[row] += lengths[order[k]]
            assign.append(row)
            place(k + 1)
            assign.pop()
            loads[row] -= lengths[order[k]]

    place(0)
    return best


def packed_batch(pairs: Sequence[dict[str, Any]], pad_id: int, token_budget: int, prompt_targets: bool = False,
                 attention: str = "sdpa") -> dict[str, Any]:
    """`attention` sdpa: rows from `balance_rows` and the dense mask (`packed_mask`) as `attention_mask`; flex and
    pairs: all pairs in one row (no padding) and no dense mask — the model's inputs get a BlockMask, or each pair's
    own block (engine/pair_attention.py), from `owner` and `kind`."""
    n = len(pairs)
    lengths = [len(p["prompt_ids"]) + len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in pairs]
    rows = balance_rows(lengths, token_budget) if attention == "sdpa" else [list(range(n))]
    width = max(sum(lengths[i] for i in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (R, L)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)  # (R, L)
    owner = torch.full((len(rows), width), -1, dtype=torch.long)  # (R, L) pair index, -1 for padding
    kind = torch.full((len(rows), width), PAD, dtype=torch.long)  # (R, L)
    keep = torch.zeros((len(rows), width), dtype=torch.bool)  # (R, L)
    entries = []
    score_index = torch.zeros(2 * n, dtype=torch.long)  # (2B,)
    for r, row in enumerate(rows):
        offset = 0
        for index in row:
            p, c, rj = pairs[index]["prompt_ids"], pairs[index]["chosen_ids"], pairs[index]["rejected_ids"]
            span = slice(offset, offset + lengths[index])
            input_ids[r, span] = torch.tensor(p + c + rj)
            position_ids[r, span] = torch.cat([torch.arange(len(p) + len(c)), torch.arange(len(p), len(p) + len(rj))])
            owner[r, span] = index
            kind[r, span] = torch.tensor([PROMPT] * len(p) + [CHOSEN] * len(c) + [REJECTED] * len(rj))
            last_prompt = offset + len(p) - 1
            rejected_start = offset + len(p) + len(c)
            keep[r, last_prompt : last_prompt + len(c)] = True  # predicts chosen
            keep[r, rejected_start : rejected_start + len(rj) - 1] = True  # predicts rejected[1:]
            entries.append((index, r, c, last_prompt, last_prompt + 1))
            entries.append((n + index, r, rj, last_prompt, rejected_start))
            score_index[index] = r * width + offset + max(last_real(p + c, pad_id), 0)
            # The rejected sequence is prompt · rejected; its last real token may sit in the shared prompt.
            in_rejected = last_real(rj, pad_id)
            position = rejected_start + in_rejected if in_rejected >= 0 else offset + max(last_real(p, pad_id), 0)
            score_index[n + index] = r * width + position
            if prompt_targets and len(p) > 1:  # the shared prompt's tokens, counted once (see padded_batch)
                keep[r, offset:last_prompt] = True
                entries.append((2 * n + index, r, p[1:], offset, offset + 1))
            offset += lengths[index]
    batch = {"input_ids": input_ids, "position_ids": position_ids, "owner": owner, "kind": kind,
             "real_tokens": sum(lengths), "computed_tokens": input_ids.numel(), "score_index": score_index,
             **_finish(n, width, keep, entries)}
    if attention == "sdpa":
        batch["attention_mask"] = packed_mask(owner, kind)
    return batch


def packed_mask(owner: torch.Tensor, kind: torch.Tensor) -> torch.Tensor:
    """(R, L) pair index and kind -> (R, 1, L, L) boolean mask: query i may attend key j iff same pair, j <= i, and
    not (i rejected, j chosen); padding sees itself (a row with no key would give SDPA NaNs)."""
    width = owner.shape[-1]
    causal = torch.ones(width, width, dtype=torch.bool, device=owner.device).tril()
    mask = (owner[:, :, None] == owner[:, None, :]) & causal & (owner[:, :, None] >= 0)  # (R, L, L)
    mask &= ~((kind[:, :, None] == REJECTED) & (kind[:, None, :] == CHOSEN))
    mask |= torch.eye(width, dtype=torch.bool, device=owner.device)
    return mask[:, None]


def to_device(batch: Any, device) -> Any:
    """Tensors of a batch moved to `device`."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, list):
        return [to_device(v, device) for v in batch]
    return batch
