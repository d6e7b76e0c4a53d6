"""Block selection shared by every backend: top `nsel` blocks per token and KV group, exactly as SPEC §2.1."""
from __future__ import annotations

import torch
from torch import Tensor


def select_blocks(group_scores: Tensor, query_pos: Tensor, block_size: int, nsel: int) -> Tensor:
    """Pick the `nsel` highest-scoring candidate blocks per row.

    group_scores: [B, Hkv, R, nb] float block scores (group max over the GQA group); only blocks with
        `j * block_size <= query_pos` are candidates (the rest may hold anything).
    query_pos:   [R] or [B, R] integer position of each row's query token.
    Returns int32 [B, Hkv, R, nsel]: the chosen block indices sorted ascending, -1 padding at the end when a row
    has fewer than `nsel` candidates. Ties go to the lower block index (a stable descending sort).

    >>> s = torch.tensor([[[[0.1, 0.5, 0.5, 0.2]]]])
    >>> select_blocks(s, torch.tensor([63]), 16, 2).tolist()
    [[[[1, 2]]]]
    """
    B, H, R, nb = group_scores.shape
    pos = query_pos.to(group_scores.device).long()
    pos = pos.view(1, 1, R) if pos.dim() == 1 else pos.view(B, 1, R)
    blocks = torch.arange(nb, device=group_scores.device)
    candidate = blocks.view(1, 1, 1, nb) * block_size <= pos.unsqueeze(-1)  # [B|1, 1, R, nb]
    scores = torch.where(candidate, group_scores.float(), torch.full((), -1.0, device=group_scores.device))
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :nsel]  # [B, H, R, <=nsel]
    valid = torch.gather(candidate.expand(B, H, R, nb), -1, order)
    chosen = torch.where(valid, order, torch.full((), nb, device=order.device))  # invalid sorts last
    chosen = torch.sort(chosen, dim=-1).values
    chosen = torch.where(chosen == nb, torch.full((), -1, device=order.device), chosen).to(torch.int32)
    if chosen.shape[-1] < nsel:  # fewer blocks than nsel in the whole sequence
        pad = chosen.new_full((B, H, R, nsel - chosen.shape[-1]), -1)
        chosen = torch.cat([chosen, pad], dim=-1)
    return chosen
