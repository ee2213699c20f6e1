"""Degree-padded neighbour tables of a pool of graphs: the static input of :class:`~ppd.models.qnet_dense.DenseQNetwork`.

Each relation's incoming edges are stored per image as ``nbr (I, R_r, K_r)`` (source node of each slot),
``attr`` (edge distance) and ``valid`` (False on padding). Row ``i < N`` holds node i's first ``K_r``
incoming edges; nodes with a larger in-degree continue in *overflow* rows (``row_node``), so one hub does
not pad every node to its degree. :func:`dense_graphs` builds the tables from PyG-style edge lists.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["DenseGraphs", "neighbour_table", "split_rows", "dense_graphs", "gat_self_loops"]


@dataclass
class DenseGraphs:
    """Static per-image inputs of :class:`DenseQNetwork` (build once per image pool).

    Attributes:
        x_static: ``(I, N, D - 3)`` float32 status-independent node features (the Q-network's input is
            ``[x_static, one_hot(status)]``).
        nbr: per relation ``(I, N, K_r)`` long source node of each incoming edge slot (0 on padding).
        attr: per relation ``(I, N, K_r)`` float32 edge attribute (0 on padding).
        valid: per relation ``(I, R_r, K_r)`` bool, False on padding. Valid slots come first in each row.
        row_node: per relation ``(I, R_r - N)`` long: the node of each *overflow* row. Row ``i < N`` holds
            node i's first ``K_r`` incoming edges; a node with more edges continues in overflow rows
            (so one hub does not pad every node to its degree). Empty ``(I, 0)`` when no node overflows.
    """

    x_static: Tensor
    nbr: tuple[Tensor, ...]
    attr: tuple[Tensor, ...]
    valid: tuple[Tensor, ...]
    row_node: tuple[Tensor, ...] = ()

    def __post_init__(self) -> None:
        if not self.row_node:
            i = self.x_static.shape[0]
            self.row_node = tuple(
                torch.zeros(i, 0, dtype=torch.long, device=self.x_static.device) for _ in self.nbr
            )

    @property
    def num_images(self) -> int:
        return int(self.x_static.shape[0])

    @property
    def num_nodes(self) -> int:
        return int(self.x_static.shape[1])

    def to(self, device: torch.device | str) -> DenseGraphs:
        """Copy on ``device``."""
        return DenseGraphs(
            self.x_static.to(device),
            tuple(t.to(device) for t in self.nbr),
            tuple(t.to(device) for t in self.attr),
            tuple(t.to(device) for t in self.valid),
            tuple(t.to(device) for t in self.row_node),
        )

    def nbytes(self) -> int:
        """Bytes held by the tensors."""
        ts = (self.x_static, *self.nbr, *self.attr, *self.valid, *self.row_node)
        return sum(t.numel() * t.element_size() for t in ts)


def neighbour_table(
    edge_index: Tensor, edge_attr: Tensor, num_nodes: int, width: int | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Degree-padded incoming-neighbour table of one relation of one graph.

    Args:
        edge_index: ``(2, E)`` long, row 0 source ``j``, row 1 target ``i`` (PyG ``source_to_target``).
        edge_attr: ``(E,)`` or ``(E, 1)`` edge attributes.
        num_nodes: N.
        width: table width ``K`` (default: the largest in-degree; must be >= it).

    Returns:
        ``nbr (N, K)`` long, ``attr (N, K)`` float32, ``valid (N, K)`` bool; the edges of each target keep
        their edge-list order.
    """
    if edge_index.dim() != 2 or edge_index.shape[0] != 2:
        raise ValueError(f"neighbour_table: edge_index must be (2, E), got {tuple(edge_index.shape)}")
    src, dst = edge_index[0].long(), edge_index[1].long()
    attr = edge_attr.reshape(-1).float()
    if attr.shape[0] != src.shape[0]:
        raise ValueError(f"neighbour_table: {src.shape[0]} edges but {attr.shape[0]} edge attributes")
    deg = torch.bincount(dst, minlength=num_nodes)
    k = int(deg.max()) if deg.numel() and src.numel() else 0
    if width is not None:
        if width < k:
            raise ValueError(f"neighbour_table: width {width} < largest in-degree {k}")
        k = width
    order = torch.sort(dst, stable=True).indices
    dst_s = dst[order]
    start = torch.zeros(num_nodes + 1, dtype=torch.long)
    torch.cumsum(deg, 0, out=start[1:])
    slot = torch.arange(dst_s.numel()) - start[dst_s]
    nbr = torch.zeros(num_nodes, k, dtype=torch.long)
    table_attr = torch.zeros(num_nodes, k)
    valid = torch.zeros(num_nodes, k, dtype=torch.bool)
    nbr[dst_s, slot] = src[order]
    table_attr[dst_s, slot] = attr[order]
    valid[dst_s, slot] = True
    return nbr, table_attr, valid


def split_rows(nbr: Tensor, attr: Tensor, valid: Tensor, width: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Re-pack one image's ``(N, K)`` table into ``N + overflow`` rows of ``width`` slots.

    Args:
        nbr, attr, valid: ``(N, K)`` from :func:`neighbour_table`.
        width: slots per row (>= 1).

    Returns:
        ``nbr (R, width)``, ``attr (R, width)``, ``valid (R, width)`` and ``row_node (R - N,)``; row
        ``i < N`` holds node i's slots ``0 .. width - 1``, its later slots follow in its overflow rows.
    """
    n, _ = nbr.shape
    deg = valid.sum(1)
    extra = (torch.div(deg + width - 1, width, rounding_mode="floor") - 1).clamp_min(0)
    first = torch.cumsum(extra, 0) - extra  # first overflow row of each node (minus N)
    rows = n + int(extra.sum())
    out_n = torch.zeros(rows, width, dtype=torch.long)
    out_a = torch.zeros(rows, width)
    out_v = torch.zeros(rows, width, dtype=torch.bool)
    i, slot = valid.nonzero(as_tuple=True)
    chunk, col = torch.div(slot, width, rounding_mode="floor"), slot % width
    row = torch.where(chunk == 0, i, n + first[i] + chunk - 1)
    out_n[row, col], out_a[row, col], out_v[row, col] = nbr[i, slot], attr[i, slot], True
    row_node = torch.repeat_interleave(torch.arange(n), extra)
    return out_n, out_a, out_v, row_node


def _best_width(degrees: list[Tensor], row_cost: int = 2) -> int:
    """Row width minimising the padded work ``max_images(rows) * (width + row_cost)``."""
    kmax = max(int(d.max()) if d.numel() else 0 for d in degrees)
    best, best_cost = max(kmax, 1), None
    for w in range(1, max(kmax, 1) + 1):
        rows = max(int(d.numel() + ((d + w - 1) // w - 1).clamp_min(0).sum()) for d in degrees)
        cost = rows * (w + row_cost)
        if best_cost is None or cost < best_cost:
            best, best_cost = w, cost
    return best


def dense_graphs(
    x_static: Tensor | list[Tensor],
    edge_index: list[Tensor],
    edge_attr: list[Tensor],
    edge_type: list[Tensor],
    num_relations: int = 2,
    split: bool = True,
) -> DenseGraphs:
    """Stack per-image edge lists into :class:`DenseGraphs` (padded to the pool's largest degree).

    Args:
        x_static: ``(I, N, D - 3)`` or a list of I ``(N, D - 3)`` tensors.
        edge_index: I tensors ``(2, E_i)``.
        edge_attr: I tensors ``(E_i, 1)``.
        edge_type: I tensors ``(E_i,)`` relation ids in ``[0, num_relations)``.
        num_relations: R.
        split: choose a row width per relation that minimises padding and move the edges of nodes with
            a larger in-degree to overflow rows (default); False: one row per node, width = the largest
            in-degree of the pool.

    Returns:
        :class:`DenseGraphs`.
    """
    xs = torch.stack(list(x_static)) if isinstance(x_static, list) else x_static
    if xs.dim() != 3:
        raise ValueError(
            f"dense_graphs: x_static must be (I, N, D) or a list of (N, D), got {tuple(xs.shape)}"
        )
    n = int(xs.shape[1])
    if not len(edge_index) == len(edge_attr) == len(edge_type) == xs.shape[0]:
        raise ValueError(
            f"dense_graphs: {xs.shape[0]} images but {len(edge_index)} edge_index, {len(edge_attr)} "
            f"edge_attr, {len(edge_type)} edge_type entries"
        )
    per_rel: list[list[tuple[Tensor, Tensor, Tensor]]] = [[] for _ in range(num_relations)]
    for ei, ea, et in zip(edge_index, edge_attr, edge_type, strict=True):
        if et.numel() and (int(et.min()) < 0 or int(et.max()) >= num_relations):
            raise ValueError(f"dense_graphs: edge_type values must lie in [0, {num_relations})")
        for r in range(num_relations):
            keep = et == r
            per_rel[r].append(neighbour_table(ei[:, keep], ea.reshape(-1)[keep], n))
    nbr, attr, valid, row_node = [], [], [], []
    for tables in per_rel:
        k = max(t[0].shape[1] for t in tables)
        if split:
            w = _best_width([t[2].sum(1) for t in tables])
            tables = [split_rows(*t, w) for t in tables]
        else:
            w = k
            tables = [(*t, torch.zeros(0, dtype=torch.long)) for t in tables]
        r_max = max(t[0].shape[0] for t in tables)

        def pad(t: Tensor, r_max: int = r_max, w: int = w) -> Tensor:
            return F.pad(t, (0, w - t.shape[1], 0, r_max - t.shape[0]))

        nbr.append(torch.stack([pad(t[0]) for t in tables]))
        attr.append(torch.stack([pad(t[1]) for t in tables]))
        valid.append(torch.stack([pad(t[2]) for t in tables]))
        row_node.append(torch.stack([F.pad(t[3], (0, r_max - n - t[3].shape[0])) for t in tables]))
    return DenseGraphs(xs.float(), tuple(nbr), tuple(attr), tuple(valid), tuple(row_node))


def gat_self_loops(
    nbr: Tensor, attr: Tensor, valid: Tensor, rn: Tensor, num_nodes: int
) -> tuple[Tensor, Tensor, Tensor]:
    """GATv2Conv's ``remove_self_loops`` + ``add_self_loops(fill_value="mean")`` on row tables.

    Args:
        nbr, attr, valid: ``(U, R, K)``; rn: ``(U, R - N)`` node of each overflow row.
        num_nodes: N.

    Returns:
        ``(U, R, K + 1)`` tables: existing self loops dropped, then one self slot on each node's primary
        row whose attribute is the mean attribute of the node's remaining incoming edges (0 if none).
    """
    u = nbr.shape[0]
    node = torch.cat([torch.arange(num_nodes, device=nbr.device).expand(u, num_nodes), rn], 1)  # (U, R)
    valid = valid & (nbr != node.unsqueeze(-1))
    cnt = torch.zeros(u, num_nodes, device=nbr.device).scatter_add(1, node, valid.sum(-1).float())
    tot = torch.zeros(u, num_nodes, device=nbr.device).scatter_add(1, node, (attr * valid).sum(-1))
    mean = tot / cnt.clamp_min(1)
    primary = torch.zeros_like(node, dtype=torch.bool)
    primary[:, :num_nodes] = True
    nbr = torch.cat([nbr, node.unsqueeze(-1)], -1)
    attr = torch.cat([attr, mean.gather(1, node).unsqueeze(-1)], -1)
    valid = torch.cat([valid, primary.unsqueeze(-1)], -1)
    return nbr, attr, valid
