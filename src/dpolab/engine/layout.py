"""Batch layouts. Both give the model inputs plus a gather plan (which hidden state predicts which target token).

padded: chosen and rejected as 2B separate right-padded rows (the layout TRL uses), causal attention.
packed: each pair once as `prompt · chosen · rejected`, several pairs per row up to a token budget, no padding
        inside a row. Position ids restart at 0 for each pair and continue from the prompt for *both* responses;
        a 4D boolean mask lets chosen see prompt+chosen, rejected see prompt+rejected (never chosen), and no pair
        see another. The first rejected token is predicted from the prompt's last hidden state, like the first
        chosen one. On the HH data this computes 495k instead of 784k (separate) or 1.79M (padded) tokens per epoch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

PROMPT, CHOSEN, REJECTED, PAD = 0, 1, 2, 3


def _plan(n_pairs: int, entries: list[tuple[int, list[int], int, int]]) -> dict[str, torch.Tensor]:
    """entries: (seq index, target ids, flat index of the state predicting the first target, stride of states)."""
    pred, target, seq = [], [], []
    for seq_index, ids, first_state, following in entries:
        pred.append(first_state)
        pred.extend(following + k for k in range(len(ids) - 1))
        target.extend(ids)
        seq.extend([seq_index] * len(ids))
    return {"pred_index": torch.tensor(pred, dtype=torch.long), "target_ids": torch.tensor(target, dtype=torch.long),
            "seq_index": torch.tensor(seq, dtype=torch.long), "n_seqs": 2 * n_pairs}


def padded_batch(pairs: Sequence[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    n = len(pairs)
    sequences = [p["prompt_ids"] + p["chosen_ids"] for p in pairs] + [p["prompt_ids"] + p["rejected_ids"] for p in pairs]
    width = max(map(len, sequences))
    input_ids = torch.full((2 * n, width), pad_id, dtype=torch.long)  # (2B, T)
    attention_mask = torch.zeros((2 * n, width), dtype=torch.long)  # (2B, T)
    entries = []
    for row, seq in enumerate(sequences):
        input_ids[row, : len(seq)] = torch.tensor(seq)
        attention_mask[row, : len(seq)] = 1
        pair = pairs[row % n]
        response = pair["chosen_ids"] if row < n else pair["rejected_ids"]
        start = row * width + len(pair["prompt_ids"]) - 1  # state predicting the first response token
        entries.append((row, response, start, start + 1))
    return {"input_ids": input_ids, "attention_mask": attention_mask, "real_tokens": int(attention_mask.sum()),
            **_plan(n, entries)}


def pack_rows(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """First-fit-decreasing bin packing of pair lengths into rows of at most `budget` tokens (a longer pair gets its own row)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, free in enumerate(room):
            if lengths[index] <= free:
                rows[r].append(index)
                room[r] -= lengths[index]
                break
        else:
            rows.append([index])
            room.append(budget - lengths[index])
    return rows


def packed_batch(pairs: Sequence[dict[str, Any]], pad_id: int, token_budget: int) -> dict[str, Any]:
    n = len(pairs)
    lengths = [len(p["prompt_ids"]) + len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in pairs]
    rows = pack_rows(lengths, token_budget)
    width = max(sum(lengths[i] for i in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (R, L)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)  # (R, L)
    owner = torch.full((len(rows), width), -1, dtype=torch.long)  # (R, L) pair index, -1 for padding
    kind = torch.full((len(rows), width), PAD, dtype=torch.long)  # (R, L)
    entries = []
    for r, row in enumerate(rows):
        offset = 0
        for index in row:
            p, c, rj = pairs[index]["prompt_ids"], pairs[index]["chosen_ids"], pairs[index]["rejected_ids"]
            span = slice(offset, offset + lengths[index])
            input_ids[r, span] = torch.tensor(p + c + rj)
            position_ids[r, span] = torch.cat([torch.arange(len(p) + len(c)), torch.arange(len(p), len(p) + len(rj))])
            owner[r, span] = index
            kind[r, span] = torch.tensor([PROMPT] * len(p) + [CHOSEN] * len(c) + [REJECTED] * len(rj))
            base = r * width + offset
            last_prompt = base + len(p) - 1
            entries.append((index, c, last_prompt, last_prompt + 1))
            entries.append((n + index, rj, last_prompt, base + len(p) + len(c)))
            offset += lengths[index]
    # (R, 1, L, L): query i may attend key j iff same pair, j <= i, and not (i rejected, j chosen); padding sees itself.
    same = owner[:, :, None] == owner[:, None, :]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    cross = (kind[:, :, None] == REJECTED) & (kind[:, None, :] == CHOSEN)
    mask = same & causal & ~cross & (owner[:, :, None] >= 0)
    mask |= torch.eye(width, dtype=torch.bool)
    entries.sort(key=lambda e: e[0])
    return {"input_ids": input_ids, "position_ids": position_ids, "attention_mask": mask[:, None],
            "real_tokens": sum(lengths), **_plan(n, entries)}
