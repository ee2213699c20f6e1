"""Tensor helpers of the dense Q-network: masked reductions over flat actions, row/node gathers and the
PyG-equivalent grouped softmax over degree-padded neighbour rows (see :mod:`ppd.models.dense_graphs`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "dense_masked_argmax",
    "dense_masked_max",
    "expand_index",
    "node_rows",
    "to_nodes",
    "grouped_softmax",
    "masked_softmax",
]

# --------------------------------------------------------------------------------------------------
# Dense per-state reductions over flat actions ``node * K + k`` (B, N * K).
# --------------------------------------------------------------------------------------------------


def dense_masked_argmax(q: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Best valid flat action per state, ties to the lowest index (as :func:`~ppd.models.qnet.masked_argmax`).

    Args:
        q: ``(B, A)`` Q-values; mask: ``(B, A)`` bool.

    Returns:
        ``action (B,)`` long (-1 where nothing is valid), ``value (B,)`` (-inf there).
    """
    qm = q.masked_fill(~mask, float("-inf"))
    value = qm.amax(1)
    idx = torch.arange(q.shape[1], device=q.device).expand_as(q)
    hit = mask & (qm == value[:, None])
    big = torch.iinfo(torch.long).max
    action = torch.where(hit, idx, torch.full_like(idx, big)).amin(1)
    action = torch.where(action == big, torch.full_like(action, -1), action)
    return action, value


def dense_masked_max(q: Tensor, mask: Tensor) -> Tensor:
    """``(B,)`` best valid Q-value per state (``-inf`` where nothing is valid)."""
    return q.masked_fill(~mask, float("-inf")).amax(1)


# --------------------------------------------------------------------------------------------------
# Rows (nodes + overflow rows) <-> nodes, softmax over each node's valid slots
# --------------------------------------------------------------------------------------------------


def expand_index(rn: Tensor, like: Tensor) -> Tensor:
    """``rn (B, O)`` expanded to gather/scatter rows of ``like (B, ., *rest)`` along dim 1."""
    return rn.view(*rn.shape, *([1] * (like.dim() - 2))).expand(rn.shape[0], rn.shape[1], *like.shape[2:])


def node_rows(x: Tensor, rn: Tensor) -> Tensor:
    """Per-row copy of node tensors: ``x (B, N, ...)`` -> ``(B, N + O, ...)`` (overflow rows repeat their node)."""
    if rn.shape[1] == 0:
        return x
    return torch.cat([x, x.gather(1, expand_index(rn, x))], 1)


def to_nodes(x: Tensor, rn: Tensor, n: int) -> Tensor:
    """Sum of row tensors per node: ``x (B, N + O, ...)`` -> ``(B, N, ...)``."""
    if rn.shape[1] == 0:
        return x
    return x[:, :n].scatter_add(1, expand_index(rn, x[:, n:]), x[:, n:])


def grouped_softmax(score: Tensor, valid: Tensor, rn: Tensor, n: int, p: float, training: bool) -> Tensor:
    """Softmax of ``score (B, R, K, h)`` over all valid slots of each node's rows, as PyG's ``softmax``."""
    if rn.shape[1] == 0:
        return masked_softmax(score, valid, p, training)
    s = score.masked_fill(~valid.unsqueeze(-1), float("-inf"))
    row_max = s.detach().amax(2)  # (B, R, h)
    idx = expand_index(rn, row_max[:, n:])
    node_max = row_max[:, :n].scatter_reduce(1, idx, row_max[:, n:], reduce="amax", include_self=True)
    node_max = torch.where(torch.isfinite(node_max), node_max, torch.zeros_like(node_max))
    e = (s - node_rows(node_max, rn).unsqueeze(2)).exp()
    node_sum = to_nodes(e.sum(2), rn, n)
    alpha = e / (node_rows(node_sum, rn).unsqueeze(2) + 1e-16)
    if p > 0 and training:
        alpha = F.dropout(alpha, p=p, training=True)
    return alpha


def masked_softmax(score: Tensor, valid: Tensor, p: float, training: bool) -> Tensor:
    """Softmax over the neighbour axis (dim 2) of ``score (B, N, K, h)`` as PyG's ``softmax``.

    Padding slots get weight 0; a node without valid slots gets all-zero weights (no messages).
    """
    v = valid.unsqueeze(-1)
    s = score.masked_fill(~v, float("-inf"))
    mx = s.detach().amax(2, keepdim=True) if s.shape[2] else s.new_zeros(*s.shape[:2], 1, s.shape[3])
    mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    e = (s - mx).exp()
    alpha = e / (e.sum(2, keepdim=True) + 1e-16)
    if p > 0 and training:
        alpha = F.dropout(alpha, p=p, training=True)
    return alpha
