"""Reference log-prob cache: the frozen reference never changes, so its log-probs are computed once and reused
across epochs, runs and sweep trials.

Key: (reference weights content hash, dtype) names the cache file beside the prepared data; inside it each pair is
keyed by `id`, a hash of its token ids (layout-independent). Changing the weights or the dtype selects another
file; changing the data or its tokenization changes the ids, so stale entries are never read, only missing ones
computed. Files are replaced atomically (write + rename): a reader never sees a half-written cache.
Neither the layout nor the attention backend (SDPA's dense mask, SDPA pair by pair or FlexAttention's BlockMask) is
in the key: they compute the same log π_ref(y|x) in another order, equal within fp32 rounding (tested:
tests/test_flex.py, tests/test_pair_attention.py, 1e-5 relative), as a different batch composition already does;
keying them would only recompute the cache when a run moves between a CPU (pairs) and a GPU (flex). The dtype is in the key: bf16 changes the values themselves.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from dpolab.fsutil import atomic_write_text, file_lock

# Pairs per reference forward, independent of the training batch, so the cache holds the same values for a run of
# any batch size or process count (bitwise, given the same token budget).
REFERENCE_BATCH = 8


def cache_path(data_dir: Path, weights_key: str, dtype: torch.dtype, variant: str = "") -> Path:
    """`variant` names another way of summing token log-probs (LD-DPO's weights): another file."""
    from dpolab.folders.prepared import PreparedFolder

    key = hashlib.sha256(f"{weights_key}|{dtype}{'|' + variant if variant else ''}".encode()).hexdigest()[:20]
    return PreparedFolder(Path(data_dir)).refcache_dir / f"{key}.json"


def read_cache(path: Path) -> dict[str, tuple[float, float]]:
    if not path.is_file():
        return {}
    return {k: tuple(v) for k, v in json.loads(path.read_text())["logps"].items()}


def write_cache(path: Path, logps: dict[str, tuple[float, float]], meta: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps({"meta": meta, "logps": logps}))


@torch.no_grad()
def compute_logps(model, pairs: Sequence[dict[str, Any]], collate, batch_size: int, device, progress: bool = True
                  ) -> dict[str, tuple[float, float]]:
    """Reference (chosen, rejected) log-probs per pair id, with the model in eval mode."""
    from tqdm.auto import tqdm

    from dpolab.engine.layout import to_device
    from dpolab.engine.logprobs import batch_logps

    was_training = model.training
    model.eval()
    out: dict[str, tuple[float, float]] = {}
    batches = range(0, len(pairs), batch_size)
    for start in tqdm(batches, desc="reference log-probs", unit="batch", disable=not progress, leave=False):
        chunk = pairs[start : start + batch_size]
        batch = collate(chunk, with_ref=False)
        batch = to_device(batch, device)
        logps = batch_logps(model, batch).float().cpu()
        n = len(chunk)
        for i, pair in enumerate(chunk):
            out[pair["id"]] = (float(logps[i]), float(logps[n + i]))
    model.train(was_training)
    return out


def ensure_reference(pairs: Sequence[dict[str, Any]], path: Path, load_reference, collate, batch_size: int, device,
                     meta: dict[str, Any]) -> tuple[dict[str, tuple[float, float]], int]:
    """All pairs' reference log-probs, computing only missing ones. Returns (log-probs, pairs computed now)."""
    cached = read_cache(path)
    missing = [p for p in pairs if p["id"] not in cached]
    if not missing:  # warm: no lock, no model
        return cached, 0
    with file_lock(path.with_suffix(".lock")):  # concurrent sweep workers / ranks: one computes, the rest reuse
        cached = read_cache(path)
        missing = [p for p in pairs if p["id"] not in cached]
        if missing:
            cached.update(compute_logps(load_reference(), missing, collate, batch_size, device))
            write_cache(path, cached, meta)
    return cached, len(missing)
