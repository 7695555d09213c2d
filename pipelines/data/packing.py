"""Packing tokenized rows into fixed-length blocks, and the collate that turns rows into model inputs.

A packed row holds several sequences back to back: `input_ids`, `labels` (concatenated) and `seq_lens`.
`collate` gives every sequence its own position ids (0, 1, …) and a block-diagonal causal 4D float mask, so
no token attends across a boundary; the first label of each sequence is ignored, so no token is predicted from
the previous sequence either. The loss of a block then equals the token-weighted loss of its sequences run
alone (tests/unit/data/test_packing.py proves it on a tiny Llama). Pure bin fitting here; torch only in `collate`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

IGNORE_INDEX = -100


def first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices grouped into bins whose lengths sum to ≤ capacity; longest first, each into the first bin with
    room. Deterministic (ties keep input order). A length over capacity is an error (rows were bounded earlier)."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"sequence of {n} tokens does not fit a block of {capacity}")
        for b, r in enumerate(room):
            if n <= r:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(capacity - n)
    return bins


def pack_rows(batch: dict[str, Any], capacity: int) -> dict[str, list]:
    """A batch of unpacked rows (input_ids, labels) → packed rows (input_ids, labels, seq_lens, n_tokens).
    With a `split` column, rows are packed only with rows of the same split (and keep that column)."""
    ids, labels = list(batch["input_ids"]), list(batch["labels"])
    splits = [str(s) for s in batch["split"]] if "split" in batch else [""] * len(ids)
    out: dict[str, list] = {"input_ids": [], "labels": [], "seq_lens": [], "n_tokens": [], "split": []}
    groups = []
    for name in sorted(set(splits)):
        mine = [i for i, s in enumerate(splits) if s == name]
        groups += [[mine[j] for j in g] for g in first_fit_decreasing([len(ids[i]) for i in mine], capacity)]
    for group in groups:
        out["split"].append(splits[group[0]])
        out["input_ids"].append(np.concatenate([np.asarray(ids[i], dtype=np.int64) for i in group]).tolist())
        out["labels"].append(np.concatenate([np.asarray(labels[i], dtype=np.int64) for i in group]).tolist())
        out["seq_lens"].append([len(ids[i]) for i in group])
        out["n_tokens"].append(sum(len(ids[i]) for i in group))
    if "split" not in batch:
        del out["split"]
    return out


def collate(rows: dict[str, Any], pad_id: int, *, dtype=None, mask: str = "float") -> dict[str, Any]:
    """Rows (columns of lists, as Ray Data's numpy batches) → model inputs as torch tensors.

    Unpacked rows (no `seq_lens`): right-padded input_ids, labels (-100 on padding) and a 2D attention_mask.
    Packed rows: input_ids, labels, position_ids reset per sequence, and by `mask`:
    - "float": attention_mask as a (batch, 1, L, L) float mask in `dtype` — 0 where a query may attend, the
      dtype's minimum elsewhere — which transformers passes through to sdpa and eager attention unchanged;
    - "segments": `segment_ids` (batch, L), each position's sequence number (-1: padding), from which
      `attention_inputs` builds the mask the attention kernel wants on the worker's device (none at all for
      flash-attention's varlen path), instead of shipping L² values per row from the host.
    """
    import torch

    dtype = dtype or torch.float32
    ids = [np.asarray(x, dtype=np.int64) for x in rows["input_ids"]]
    labels = [np.asarray(x, dtype=np.int64) for x in rows["labels"]]
    width = max(len(x) for x in ids)
    n = len(ids)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    lab = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    for i, (x, y) in enumerate(zip(ids, labels)):
        input_ids[i, :len(x)] = torch.from_numpy(x)
        lab[i, :len(y)] = torch.from_numpy(y)
    if "seq_lens" not in rows:
        mask = (torch.arange(width)[None, :] < torch.tensor([len(x) for x in ids])[:, None]).long()
        return {"input_ids": input_ids, "labels": lab, "attention_mask": mask}
    seg = torch.full((n, width), -1, dtype=torch.long)  # sequence number of each position; -1 = padding
    pos = torch.zeros((n, width), dtype=torch.long)
    for i, lens in enumerate(rows["seq_lens"]):
        start = 0
        for k, L in enumerate(int(v) for v in lens):
            seg[i, start:start + L] = k
            pos[i, start:start + L] = torch.arange(L)
            lab[i, start] = IGNORE_INDEX  # never predict a sequence's first token from the one before it
            start += L
    if mask == "segments":
        return {"input_ids": input_ids, "labels": lab, "position_ids": pos, "segment_ids": seg}
    return {"input_ids": input_ids, "labels": lab, "position_ids": pos, "attention_mask": block_mask(seg, dtype)}


def block_mask(seg, dtype):
    """The (batch, 1, L, L) block-diagonal causal mask of segment ids, on their device: boolean (True where a
    query may attend; SDPA accepts it beside a query of any dtype) for dtype torch.bool, else additive in `dtype`
    (0 / the dtype's minimum; eager attention adds it to its scores)."""
    import torch

    width = seg.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=seg.device).tril()
    same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] >= 0)
    allowed = (same & causal) | torch.eye(width, dtype=torch.bool, device=seg.device)  # padding sees itself
    if dtype == torch.bool:
        return allowed[:, None]
    return torch.zeros(allowed[:, None].shape, dtype=dtype, device=seg.device).masked_fill(
        ~allowed[:, None], torch.finfo(dtype).min)


def attention_inputs(batch: dict[str, Any], attn_implementation: str) -> dict[str, Any]:
    """A collated batch as model keyword inputs for the resolved attention kernel: packed rows' `segment_ids`
    become a boolean block mask for sdpa, an additive float32 one for eager (added to scores of any dtype), and
    nothing for
    flash_attention_2 (varlen from position_ids). Labels and counters are left out."""
    import torch

    inputs = {k: v for k, v in batch.items() if k not in ("labels", "num_tokens", "segment_ids")}
    if "segment_ids" in batch and attn_implementation != "flash_attention_2":
        kind = torch.bool if attn_implementation == "sdpa" else torch.float32
        inputs["attention_mask"] = block_mask(batch["segment_ids"], kind)
    return inputs
