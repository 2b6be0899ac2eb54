"""Batch encoded examples for causal-LM training.

`pack` is padding-free: the micro-batch becomes one row, examples back to back, with per-example position ids
(restarting at 0). transformers derives a block-diagonal causal mask from those position ids, so no token
attends across examples, and no compute is spent on padding. `pad` is the classic right-padded batch.

Both return `targets`: for each kept position t the token at t+1 (only positions whose next token is trained
are kept), and `keep`, the indices of those positions, so the LM head runs only where a loss is taken.
"""

from __future__ import annotations

import torch

from tunelab.data.templates import IGNORE_INDEX, Encoded


def _shifted(labels: list[int]) -> list[int]:
    return labels[1:] + [IGNORE_INDEX]


def pack(items: list[Encoded]) -> dict[str, torch.Tensor]:
    ids: list[int] = []
    pos: list[int] = []
    tgt: list[int] = []
    for it in items:
        ids.extend(it.input_ids)
        pos.extend(range(len(it.input_ids)))
        tgt.extend(_shifted(it.labels))
    targets = torch.tensor(tgt, dtype=torch.long)
    keep = (targets != IGNORE_INDEX).nonzero().squeeze(-1)
    return {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "position_ids": torch.tensor([pos], dtype=torch.long),
        "keep": keep,
        "targets": targets[keep],
        "num_tokens": torch.tensor(len(ids)),
    }


def pack_rows(items: list[Encoded], pad_id: int, segments: bool = False) -> dict[str, torch.Tensor]:
    """Padding-free packing into several rows, each no longer than the micro-batch's longest example.

    One long row would make attention cost grow with the square of the whole micro-batch; rows capped at the
    longest example keep it at what a padded batch pays, while first-fit-decreasing bin packing leaves almost
    no padding. A row's unused tail gets positions of its own (a separate segment nothing attends to) and is
    never trained. The LM head runs on the union of trained columns (`keep`); `sel` picks each row's targets.
    `segments`: also `segment_ids`, the index in `items` of the example each target belongs to (preference
    methods sum log-probs per sequence), and `num_sequences`.
    """
    cap = max(len(it.input_ids) for it in items)
    rows: list[list[Encoded]] = []
    room: list[int] = []
    rows_at: list[list[int]] = []
    for at_i in sorted(range(len(items)), key=lambda k: -len(items[k].input_ids)):
        it = items[at_i]
        n = len(it.input_ids)
        j = next((k for k, r in enumerate(room) if r >= n), None)
        if j is None:
            rows.append([it])
            rows_at.append([at_i])
            room.append(cap - n)
        else:
            rows[j].append(it)
            rows_at[j].append(at_i)
            room[j] -= n
    width = cap - min(room)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    tgt = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    seg = torch.zeros((len(rows), width), dtype=torch.long)
    real = 0
    for i, row in enumerate(rows):
        at = 0
        for it, which in zip(row, rows_at[i], strict=True):
            n = len(it.input_ids)
            ids[i, at : at + n] = torch.tensor(it.input_ids)
            pos[i, at : at + n] = torch.arange(n)
            tgt[i, at : at + n] = torch.tensor(_shifted(it.labels))
            seg[i, at : at + n] = which
            at += n
        real += at
        pos[i, at:] = torch.arange(width - at)
    keep = (tgt != IGNORE_INDEX).any(0).nonzero().squeeze(-1)
    flat = tgt[:, keep].reshape(-1)
    sel = (flat != IGNORE_INDEX).nonzero().squeeze(-1)
    out = {"input_ids": ids, "position_ids": pos, "keep": keep, "sel": sel, "targets": flat[sel],
           "num_tokens": torch.tensor(real)}
    if segments:
        out["segment_ids"] = seg[:, keep].reshape(-1)[sel]
        out["num_sequences"] = torch.tensor(len(items))
    return out


def pad(items: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(it.input_ids) for it in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    tgt = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    for i, it in enumerate(items):
        n = len(it.input_ids)
        ids[i, :n] = torch.tensor(it.input_ids)
        mask[i, :n] = 1
        tgt[i, :n] = torch.tensor(_shifted(it.labels))
    flat = tgt.view(-1)
    keep = (flat != IGNORE_INDEX).nonzero().squeeze(-1)  # indices into the flattened (B*L) logits
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "keep_flat": keep,
        "targets": flat[keep],
        "num_tokens": mask.sum(),
    }
