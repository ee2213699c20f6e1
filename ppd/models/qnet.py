"""Relation-aware graph Q-network and per-graph masked action selection.

The observation is a :class:`torch_geometric.data.Batch` of prompt-state graphs (see
``docs/architecture.md``): node features ``x (N_total, D)``, one ``edge_index (2, E)`` with
``edge_attr (E, 1)`` and ``edge_type (E,)`` (0 = feature kNN, 1 = physical kNN) and the PyG ``batch``
vector ``(N_total,)``. Graphs may have different node counts, so every per-graph reduction below goes
through the batch vector (``Tensor.scatter_reduce``), never through a ``(B, N)`` reshape.

Flat actions are graph-local: ``action = local_node * K + k`` where ``K`` is the number of Q-values per
node (attacker ``K = 2``: ``k = 0`` positive, ``k = 1`` negative; defender ``K = 1``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch_geometric.data import Data
from torch_geometric.nn import GATv2Conv, TransformerConv

__all__ = [
    "QNetwork",
    "masked_argmax",
    "masked_max",
    "gather_action_q",
    "random_valid_action",
    "epsilon_greedy",
    "batch_ptr",
]

CONVS = ("transformer", "gatv2")


class QNetwork(nn.Module):
    """Graph Q-network with relation-aware message passing and a per-node Q head.

    Architecture: ``Linear(in_dim, hidden)`` input projection, then ``layers`` blocks of
    ``h <- ReLU(LayerNorm(h + sum_r conv_r(h, edges of relation r)))`` (+ dropout), then a per-node MLP
    ``hidden -> hidden -> out_per_node``.

    Relation awareness: every layer holds one convolution per relation (``TransformerConv`` or
    ``GATv2Conv`` with ``edge_dim=1``), each applied only to the edges of its relation, and their
    outputs are summed. This is exactly what ``HeteroConv({rel: conv}, aggr="sum")`` computes for a
    heterogeneous graph with a single node type (checked in ``tests/unit/test_qnet.py``); we split the
    single ``edge_index`` by ``edge_type`` once per forward instead of converting each batch to
    ``HeteroData`` dicts, which keeps the homogeneous ``Batch`` observation format and avoids the
    per-call dict construction.

    Args:
        in_dim: node feature size ``D = C + 2 + 3``.
        hidden: hidden width (divisible by ``heads``).
        layers: number of message-passing layers.
        heads: attention heads per convolution (head outputs are concatenated to ``hidden``).
        out_per_node: Q-values per node (attacker 2, defender 1).
        num_relations: number of edge types; ``edge_type`` values must lie in ``[0, num_relations)``.
        dropout: dropout on attention coefficients and after each block.
        conv: ``"transformer"`` (``TransformerConv``) or ``"gatv2"`` (``GATv2Conv``).
    """

    def __init__(
        self,
        in_dim: int,
        hidden: int = 128,
        layers: int = 3,
        heads: int = 2,
        out_per_node: int = 1,
        num_relations: int = 2,
        dropout: float = 0.0,
        conv: str = "transformer",
    ) -> None:
        super().__init__()
        if in_dim <= 0 or hidden <= 0 or layers < 0 or heads <= 0 or num_relations <= 0:
            raise ValueError(
                f"QNetwork: in_dim, hidden, heads, num_relations must be > 0 and layers >= 0, got "
                f"in_dim={in_dim}, hidden={hidden}, layers={layers}, heads={heads}, "
                f"num_relations={num_relations}"
            )
        if hidden % heads != 0:
            raise ValueError(f"QNetwork: hidden ({hidden}) must be divisible by heads ({heads})")
        if out_per_node not in (1, 2):
            raise ValueError(
                f"QNetwork: out_per_node must be 1 (defender) or 2 (attacker), got {out_per_node}"
            )
        if conv not in CONVS:
            raise ValueError(f"QNetwork: conv must be one of {CONVS}, got {conv!r}")
        self.in_dim = in_dim
        self.hidden = hidden
        self.out_per_node = out_per_node
        self.num_relations = num_relations
        self.conv_type = conv

        self.input = nn.Linear(in_dim, hidden)
        self.convs = nn.ModuleList(
            nn.ModuleList(self._make_conv(conv, hidden, heads, dropout) for _ in range(num_relations))
            for _ in range(layers)
        )
        self.norms = nn.ModuleList(nn.LayerNorm(hidden) for _ in range(layers))
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, out_per_node))

    @staticmethod
    def _make_conv(conv: str, hidden: int, heads: int, dropout: float) -> nn.Module:
        if conv == "transformer":
            return TransformerConv(hidden, hidden // heads, heads=heads, edge_dim=1, dropout=dropout)
        return GATv2Conv(hidden, hidden // heads, heads=heads, edge_dim=1, dropout=dropout)

    def forward(
        self,
        x: Tensor | Data,
        edge_index: Tensor | None = None,
        edge_attr: Tensor | None = None,
        edge_type: Tensor | None = None,
    ) -> Tensor:
        """Per-node Q-values.

        Args:
            x: node features ``(N_total, in_dim)``, or a PyG ``Data``/``Batch`` holding ``x``,
                ``edge_index``, ``edge_attr`` and ``edge_type`` (then the other arguments must be None).
            edge_index: ``(2, E)`` long.
            edge_attr: ``(E, 1)`` (or ``(E,)``) edge distances.
            edge_type: ``(E,)`` long relation ids in ``[0, num_relations)``.

        Returns:
            ``(N_total, out_per_node)`` Q-values.
        """
        if isinstance(x, Data):
            if edge_index is not None or edge_attr is not None or edge_type is not None:
                raise ValueError("QNetwork.forward: pass either a Data/Batch or tensors, not both")
            data = x
            for name in ("x", "edge_index", "edge_attr", "edge_type"):
                if getattr(data, name, None) is None:
                    raise ValueError(f"QNetwork.forward: the graph batch has no field {name!r}")
            x, edge_index, edge_attr, edge_type = data.x, data.edge_index, data.edge_attr, data.edge_type
        if edge_index is None or edge_attr is None or edge_type is None:
            raise ValueError("QNetwork.forward: edge_index, edge_attr and edge_type are required")
        rel_edges = self._split_relations(x, edge_index, edge_attr, edge_type)

        h = self.input(x)
        for convs, norm in zip(self.convs, self.norms, strict=True):
            msg = torch.zeros_like(h)
            for conv, (ei, ea) in zip(convs, rel_edges, strict=True):
                msg = msg + conv(h, ei, ea)
            h = self.dropout(torch.relu(norm(h + msg)))
        return self.head(h)

    def _split_relations(
        self, x: Tensor, edge_index: Tensor, edge_attr: Tensor, edge_type: Tensor
    ) -> list[tuple[Tensor, Tensor]]:
        """Validate inputs and split edges into ``num_relations`` ``(edge_index_r, edge_attr_r)`` pairs."""
        if x.dim() != 2 or x.size(1) != self.in_dim:
            raise ValueError(f"QNetwork: x must have shape (N, {self.in_dim}), got {tuple(x.shape)}")
        if edge_index.dim() != 2 or edge_index.size(0) != 2:
            raise ValueError(f"QNetwork: edge_index must have shape (2, E), got {tuple(edge_index.shape)}")
        num_edges = edge_index.size(1)
        if edge_attr.dim() == 1:
            edge_attr = edge_attr.unsqueeze(-1)
        if edge_attr.shape != (num_edges, 1):
            raise ValueError(
                f"QNetwork: edge_attr must have shape ({num_edges}, 1), got {tuple(edge_attr.shape)}"
            )
        if edge_type.shape != (num_edges,):
            raise ValueError(
                f"QNetwork: edge_type must have shape ({num_edges},), got {tuple(edge_type.shape)}"
            )
        if num_edges and (int(edge_type.min()) < 0 or int(edge_type.max()) >= self.num_relations):
            raise ValueError(
                f"QNetwork: edge_type values must lie in [0, {self.num_relations}), got "
                f"[{int(edge_type.min())}, {int(edge_type.max())}]"
            )
        edge_attr = edge_attr.to(x.dtype)
        out = []
        for r in range(self.num_relations):
            keep = edge_type == r
            out.append((edge_index[:, keep], edge_attr[keep]))
        return out


# --------------------------------------------------------------------------------------------------
# Per-graph masked selection. All reductions use Tensor.scatter_reduce over the batch vector; no Python
# loop over graphs.
# --------------------------------------------------------------------------------------------------


def _as_2d(q: Tensor, name: str) -> Tensor:
    if q.dim() == 1:
        return q.unsqueeze(-1)
    if q.dim() != 2:
        raise ValueError(f"{name} must have shape (N_total, K) or (N_total,), got {tuple(q.shape)}")
    return q


def _num_graphs(batch: Tensor, num_graphs: int | None) -> int:
    if num_graphs is not None:
        return int(num_graphs)
    return int(batch.max()) + 1 if batch.numel() else 0


def batch_ptr(batch: Tensor, num_graphs: int | None = None) -> Tensor:
    """CSR pointer of a sorted PyG batch vector.

    Args:
        batch: ``(N_total,)`` graph id of each node, sorted ascending (PyG convention).
        num_graphs: B; inferred as ``batch.max() + 1`` when None (trailing empty graphs need it).

    Returns:
        ``(B + 1,)`` long, ``ptr[b]`` = index of graph b's first node.
    """
    b = _num_graphs(batch, num_graphs)
    counts = torch.bincount(batch, minlength=b)
    if counts.numel() > b:
        raise ValueError(f"batch has graph ids >= num_graphs={b}")
    ptr = torch.zeros(b + 1, dtype=torch.long, device=batch.device)
    torch.cumsum(counts, 0, out=ptr[1:])
    return ptr


def _check(q: Tensor, mask: Tensor, batch: Tensor) -> tuple[Tensor, Tensor]:
    q = _as_2d(q, "q")
    mask = _as_2d(mask, "mask")
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be bool, got {mask.dtype}")
    if mask.shape != q.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} must equal q shape {tuple(q.shape)}")
    if batch.shape != (q.size(0),):
        raise ValueError(f"batch must have shape ({q.size(0)},), got {tuple(batch.shape)}")
    if batch.numel() > 1 and bool((batch[1:] < batch[:-1]).any()):
        raise ValueError("batch vector must be sorted ascending (PyG Batch convention)")
    return q, mask


def masked_argmax(
    q: Tensor, mask: Tensor, batch: Tensor, num_graphs: int | None = None
) -> tuple[Tensor, Tensor]:
    """Best valid action and its value for every graph.

    Ties are broken towards the lowest flat index. Q-values of valid actions must be finite (NaN or -inf
    in a valid entry may select an invalid entry of the same node).

    Args:
        q: ``(N_total, K)`` (or ``(N_total,)`` for K = 1) Q-values.
        mask: same shape, bool, True where the action is valid.
        batch: ``(N_total,)`` sorted graph id per node.
        num_graphs: B (default ``batch.max() + 1``).

    Returns:
        ``action (B,)`` long, graph-local ``local_node * K + k``, and ``value (B,)`` float. A graph with
        no valid action gets ``action = -1`` and ``value = -inf``.
    """
    q, mask = _check(q, mask, batch)
    n, k = q.shape
    b = _num_graphs(batch, num_graphs)
    if n == 0:
        return (
            torch.full((b,), -1, dtype=torch.long, device=q.device),
            torch.full((b,), float("-inf"), dtype=q.dtype, device=q.device),
        )
    neg_inf = torch.tensor(float("-inf"), dtype=q.dtype, device=q.device)
    qm = torch.where(mask, q, neg_inf)
    node_val, node_k = qm.max(dim=1)  # (N,)
    value = torch.full((b,), float("-inf"), dtype=q.dtype, device=q.device)
    value = value.scatter_reduce(0, batch, node_val, reduce="amax", include_self=True)
    # Nodes that attain their graph's maximum through a valid action; keep the first such node.
    is_best = mask.any(dim=1) & (node_val == value[batch])
    big = torch.iinfo(torch.long).max
    node_idx = torch.arange(n, device=q.device)
    cand = torch.where(is_best, node_idx, torch.full_like(node_idx, big))
    best_node = torch.full((b,), big, dtype=torch.long, device=q.device)
    best_node = best_node.scatter_reduce(0, batch, cand, reduce="amin", include_self=True)
    found = best_node != big
    ptr = batch_ptr(batch, b)
    safe = torch.where(found, best_node, torch.zeros_like(best_node))
    action = (safe - ptr[:-1]) * k + node_k[safe]
    action = torch.where(found, action, torch.full_like(action, -1))
    return action, value


def masked_max(q: Tensor, mask: Tensor, batch: Tensor, num_graphs: int | None = None) -> Tensor:
    """Best valid Q-value per graph.

    Args:
        q: ``(N_total, K)`` Q-values; mask: same shape bool; batch: ``(N_total,)``; num_graphs: B.

    Returns:
        ``(B,)``; ``-inf`` for graphs with no valid action.
    """
    q, mask = _check(q, mask, batch)
    b = _num_graphs(batch, num_graphs)
    qm = torch.where(mask, q, torch.tensor(float("-inf"), dtype=q.dtype, device=q.device))
    value = torch.full((b,), float("-inf"), dtype=q.dtype, device=q.device)
    return value.scatter_reduce(0, batch, qm.max(dim=1).values, reduce="amax", include_self=True)


def gather_action_q(q: Tensor, batch: Tensor, actions: Tensor, ptr: Tensor | None = None) -> Tensor:
    """Q-value of one graph-local flat action per graph (differentiable w.r.t. ``q``).

    Args:
        q: ``(N_total, K)`` (or ``(N_total,)``) Q-values.
        batch: ``(N_total,)`` sorted graph id per node.
        actions: ``(B,)`` long, ``local_node * K + k``; must be valid indices (no -1).
        ptr: ``(B + 1,)`` CSR pointer (``Batch.ptr``); computed from ``batch`` (with B = len(actions))
            when None.

    Returns:
        ``(B,)`` the selected Q-values.
    """
    q = _as_2d(q, "q")
    k = q.size(1)
    if actions.dim() != 1:
        raise ValueError(f"actions must have shape (B,), got {tuple(actions.shape)}")
    if ptr is None:
        ptr = batch_ptr(batch, actions.numel())
    if ptr.shape != (actions.numel() + 1,):
        raise ValueError(f"ptr must have shape ({actions.numel() + 1},), got {tuple(ptr.shape)}")
    actions = actions.long()
    limit = (ptr[1:] - ptr[:-1]) * k
    if bool(((actions < 0) | (actions >= limit)).any()):
        bad = torch.nonzero((actions < 0) | (actions >= limit)).flatten().tolist()
        raise ValueError(f"gather_action_q: actions out of range for graphs {bad[:10]} (valid: 0..N_b*K-1)")
    node = ptr[:-1] + torch.div(actions, k, rounding_mode="floor")
    return q[node, actions % k]


def random_valid_action(
    mask: Tensor, batch: Tensor, generator: torch.Generator | None = None, num_graphs: int | None = None
) -> Tensor:
    """Uniformly random valid action per graph.

    Every valid (node, k) entry gets an i.i.d. U(0, 1) key and the per-graph argmax key is taken, which
    is a uniform draw among the valid entries (random-priority sampling, vectorised over graphs).

    Args:
        mask: ``(N_total, K)`` (or ``(N_total,)``) bool, True where valid.
        batch: ``(N_total,)`` sorted graph id per node.
        generator: RNG (on the CPU; keys are moved to the mask's device). None uses the global RNG.
        num_graphs: B.

    Returns:
        ``(B,)`` long graph-local actions, -1 for graphs without a valid action.
    """
    mask = _as_2d(mask, "mask")
    gen_device = generator.device if generator is not None else torch.device("cpu")
    keys = torch.rand(mask.shape, generator=generator, device=gen_device).to(mask.device)
    return masked_argmax(keys, mask, batch, num_graphs)[0]


def epsilon_greedy(
    q: Tensor,
    mask: Tensor,
    batch: Tensor,
    epsilon: float,
    generator: torch.Generator | None = None,
    num_graphs: int | None = None,
) -> Tensor:
    """Epsilon-greedy action per graph: random valid action with probability ``epsilon``, else greedy.

    Args:
        q: ``(N_total, K)`` Q-values; mask: same shape bool; batch: ``(N_total,)``.
        epsilon: exploration probability in ``[0, 1]``.
        generator: RNG (CPU), None for the global RNG.
        num_graphs: B.

    Returns:
        ``(B,)`` long graph-local actions, -1 for graphs without a valid action.
    """
    if not 0.0 <= float(epsilon) <= 1.0:
        raise ValueError(f"epsilon must lie in [0, 1], got {epsilon}")
    b = _num_graphs(batch, num_graphs)
    greedy, _ = masked_argmax(q, mask, batch, b)
    rand = random_valid_action(mask, batch, generator, b)
    gen_device = generator.device if generator is not None else torch.device("cpu")
    explore = (torch.rand(b, generator=generator, device=gen_device) < epsilon).to(greedy.device)
    return torch.where(explore, rand, greedy)
