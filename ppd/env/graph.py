"""Dual-space patch graph over a ``G x G`` grid of DINOv2 patch tokens.

Node ``i = row * G + col`` sits at the centre of patch ``(row, col)`` (see ``docs/architecture.md``).
Two edge relations connect the nodes (paper, eq. 1 and eq. 2):

* ``feature`` (``edge_type == 0``): each node receives edges from its ``k_feature`` nearest neighbours in
  DINOv2 feature space (L2 distance of the raw tokens by default);
* ``physical`` (``edge_type == 1``): each node receives edges from its ``k_physical`` nearest neighbours by
  Euclidean distance between patch centres.

Edge direction follows PyG's ``source_to_target`` flow: ``edge_index[0]`` is the neighbour ``j`` (message
source) and ``edge_index[1]`` the centre node ``i`` (message target). The edge attribute is the distance,
divided by the largest distance of the same relation in the same image, so it lies in ``[0, 1]``.

Nearest neighbours are computed densely (``torch.cdist`` + ``topk``, equal distances broken by the smaller
node index) instead of with ``torch_geometric.nn.knn_graph``: that function needs the optional
``torch-cluster`` extension, which is not a dependency of ``ppd`` (no wheels for every torch/CUDA pair), and
its tie-breaking is unspecified. Measured on 2 CPU threads (C = 384, N = 1024 for a 32 x 32 grid):
~35 ms on an idle machine, up to ~0.45 s under load; graphs are built once per image (the environment
caches them per image id).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import torch
import torch.nn.functional as F
from torch_geometric.utils import to_undirected

from ppd.types import NUM_STATUS

FEATURE_EDGE: int = 0
PHYSICAL_EDGE: int = 1

Metric = Literal["l2", "cosine"]


@dataclass
class GraphSpec:
    """Edges of one image's dual-space graph (both relations in one ``edge_index``).

    Attributes:
        edge_index: ``(2, E)`` long; row 0 = source (neighbour ``j``), row 1 = target (centre ``i``).
        edge_attr: ``(E, 1)`` float32 distance normalised per relation to ``[0, 1]``.
        edge_type: ``(E,)`` long; ``0`` = feature relation, ``1`` = physical relation.
        num_nodes: ``N = G * G``.
    """

    edge_index: torch.Tensor
    edge_attr: torch.Tensor
    edge_type: torch.Tensor
    num_nodes: int

    def relation(self, edge_type: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Edges of one relation.

        Args:
            edge_type: ``FEATURE_EDGE`` (0) or ``PHYSICAL_EDGE`` (1).

        Returns:
            ``(edge_index (2, E_r), edge_attr (E_r, 1))`` of that relation.
        """
        keep = self.edge_type == edge_type
        return self.edge_index[:, keep], self.edge_attr[keep]

    def to(self, device: torch.device | str) -> GraphSpec:
        """Copy of the spec on ``device``."""
        return GraphSpec(
            self.edge_index.to(device), self.edge_attr.to(device), self.edge_type.to(device), self.num_nodes
        )


def _check_grid_tokens(tokens: torch.Tensor, name: str = "tokens") -> tuple[int, int, int]:
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 3:
        shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise ValueError(f"{name}: expected a (G, G, C) tensor of patch tokens, got {shape}")
    return int(tokens.shape[0]), int(tokens.shape[1]), int(tokens.shape[2])


def pool_tokens(tokens: torch.Tensor, grid: int) -> torch.Tensor:
    """Resample a token grid to the node grid with adaptive average pooling.

    Args:
        tokens: ``(Gt, Gt, C)`` DINOv2 patch tokens (any float dtype, e.g. fp16 from the feature cache).
        grid: node grid size ``G``.

    Returns:
        ``(G, G, C)`` float32 tokens; a float32 copy of the input when ``G == Gt``. When ``G > Gt`` each
        token is replicated over the bins it covers (adaptive pooling of a coarser grid).
    """
    gh, gw, _ = _check_grid_tokens(tokens)
    if grid < 1:
        raise ValueError(f"grid: expected a positive integer, got {grid}")
    tokens = tokens.float()
    if gh == grid and gw == grid:
        return tokens.clone()
    pooled = F.adaptive_avg_pool2d(tokens.permute(2, 0, 1).unsqueeze(0), (grid, grid))
    return pooled.squeeze(0).permute(1, 2, 0).contiguous()


def grid_coordinates(grid: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Integer grid coordinates of the nodes.

    Args:
        grid: node grid size ``G``.
        device: device of the result.

    Returns:
        ``(N, 2)`` long ``(col, row)`` for node ``i = row * G + col``.
    """
    if grid < 1:
        raise ValueError(f"grid: expected a positive integer, got {grid}")
    idx = torch.arange(grid * grid, device=device)
    return torch.stack([idx % grid, idx // grid], dim=1)


def node_positions(grid: int, H: int, W: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Node centres in original-image pixels.

    Args:
        grid: node grid size ``G``.
        H: original image height in pixels.
        W: original image width in pixels.
        device: device of the result.

    Returns:
        ``(N, 2)`` float32 ``(x, y)`` with ``x = (col + 0.5) * W / G``, ``y = (row + 0.5) * H / G``.
    """
    if H < 1 or W < 1:
        raise ValueError(f"image size: expected positive (H, W), got ({H}, {W})")
    cr = grid_coordinates(grid, device).float() + 0.5
    return cr * torch.tensor([W / grid, H / grid], device=cr.device)


def normalised_positions(grid: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Node centres normalised to ``[0, 1]``.

    Args:
        grid: node grid size ``G``.
        device: device of the result.

    Returns:
        ``(N, 2)`` float32 ``((col + 0.5) / G, (row + 0.5) / G)``.
    """
    return (grid_coordinates(grid, device).float() + 0.5) / grid


def _knn_from_distances(dist: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """k nearest neighbours of every row of a square distance matrix, self excluded.

    Ties are broken by the smaller node index, so the result is deterministic: ``topk`` (fast, but its
    tie order is unspecified) selects k + 1 candidates, and only rows whose k-th and (k + 1)-th distances
    are equal are redone with a stable sort.

    Args:
        dist: ``(N, N)`` distances, ``dist[i, j]`` = distance between centre ``i`` and candidate ``j``.
        k: neighbours per node (``1 <= k < N``).

    Returns:
        ``edge_index (2, N * k)`` (row 0 = neighbour, row 1 = centre, sorted by centre then distance) and
        ``distance (N * k,)``.
    """
    n = dist.shape[0]
    dist = dist.clone()
    dist.fill_diagonal_(float("inf"))
    values, nbr = torch.topk(dist, k + 1, dim=1, largest=False, sorted=True)
    tied = torch.nonzero(values[:, k - 1] == values[:, k]).reshape(-1)
    values, nbr = values[:, :k].clone(), nbr[:, :k].clone()
    if tied.numel():
        tv, tn = torch.sort(dist[tied], dim=1, stable=True)
        values[tied], nbr[tied] = tv[:, :k], tn[:, :k]
    # Canonical order inside each row: by distance, then by node index.
    order = torch.argsort(nbr, dim=1)
    values, nbr = values.gather(1, order), nbr.gather(1, order)
    order = torch.argsort(values, dim=1, stable=True)
    values, nbr = values.gather(1, order), nbr.gather(1, order)
    centre = torch.arange(n, device=dist.device).repeat_interleave(k)
    return torch.stack([nbr.reshape(-1), centre]), values.reshape(-1)


def _relation_edges(
    dist: torch.Tensor, k: int, symmetric: bool, name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    n = dist.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"{name}: expected 1 <= k < N = {n} (nodes), got {k}")
    edge_index, d = _knn_from_distances(dist, k)
    if symmetric:
        # The reverse of j -> i has the same distance, so reducing duplicates with "max" is exact.
        edge_index, d = to_undirected(edge_index, d, num_nodes=n, reduce="max")
    scale = d.max()
    d = d / scale if scale > 0 else torch.zeros_like(d)
    return edge_index, d.clamp_(0.0, 1.0)


def feature_distances(tokens: torch.Tensor, metric: Metric = "l2") -> torch.Tensor:
    """Pairwise distances between node features.

    Args:
        tokens: ``(G, G, C)`` or ``(N, C)`` tokens.
        metric: ``"l2"`` = Euclidean distance of the raw tokens (paper eq. 1); ``"cosine"`` = ``1 - cos``
            (same ranking as the L2 distance of L2-normalised tokens).

    Returns:
        ``(N, N)`` float32 distances.
    """
    feats = tokens.reshape(-1, tokens.shape[-1]).float()
    if metric == "l2":
        # float64 + cdist's matrix-multiply path: in float32 that path has ~1e-3 relative error (enough to
        # reorder near neighbours); in float64 it is exact to ~1e-12 and 3x faster than the direct path.
        f64 = feats.double()
        return torch.cdist(f64, f64, compute_mode="use_mm_for_euclid_dist").float()
    if metric == "cosine":
        unit = F.normalize(feats, dim=1)
        return (1.0 - unit @ unit.T).clamp_(min=0.0)
    raise ValueError(f"metric: expected 'l2' or 'cosine', got {metric!r}")


@lru_cache(maxsize=16)
def _physical_edges_cached(
    grid: int, k: int, symmetric: bool, image_size: tuple[int, int] | None
) -> tuple[torch.Tensor, torch.Tensor]:
    cr = grid_coordinates(grid).double()
    if image_size is not None:
        H, W = image_size
        cr = cr * torch.tensor([W / grid, H / grid], dtype=torch.float64)
    dist = torch.cdist(cr, cr, compute_mode="donot_use_mm_for_euclid_dist")
    edge_index, d = _relation_edges(dist, k, symmetric, "k_physical")
    return edge_index, d.float()


def physical_edges(
    grid: int, k: int = 8, symmetric: bool = True, image_size: tuple[int, int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Physical relation: k nearest patch centres (paper eq. 2).

    Distances are computed in float64 so that equal grid distances tie exactly; ties are broken by the
    smaller node index. The result depends only on the arguments and is memoised.

    Args:
        grid: node grid size ``G``.
        k: neighbours per node.
        symmetric: add reverse edges and drop duplicates.
        image_size: ``(H, W)`` to measure distances in original pixels (matters for non-square images);
            ``None`` (default) measures in grid cells, which gives every image the same topology.

    Returns:
        ``edge_index (2, E)`` long and ``distance (E,)`` float32 normalised to ``[0, 1]``.
    """
    edge_index, d = _physical_edges_cached(int(grid), int(k), bool(symmetric), image_size)
    return edge_index.clone(), d.clone()


def build_graph(
    tokens: torch.Tensor,
    k_feature: int = 8,
    k_physical: int = 8,
    symmetric: bool = True,
    metric: Metric = "l2",
    image_size: tuple[int, int] | None = None,
) -> GraphSpec:
    """Build the dual-space graph of one image.

    Args:
        tokens: ``(G, G, C)`` node tokens (already pooled to the node grid, see :func:`pool_tokens`).
        k_feature: feature-space neighbours per node (self excluded).
        k_physical: spatial neighbours per node (self excluded).
        symmetric: add the reverse of every edge and remove duplicates, per relation (an edge present in
            both relations is kept once in each).
        metric: feature distance, ``"l2"`` on raw tokens (paper eq. 1) or ``"cosine"``.
        image_size: see :func:`physical_edges`; ``None`` = grid units.

    Returns:
        :class:`GraphSpec` with feature edges first, then physical edges, on ``tokens.device``.
    """
    gh, gw, _ = _check_grid_tokens(tokens)
    if gh != gw:
        raise ValueError(f"tokens: expected a square (G, G, C) grid, got {tuple(tokens.shape)}")
    n = gh * gw
    f_index, f_attr = _relation_edges(feature_distances(tokens, metric), k_feature, symmetric, "k_feature")
    p_index, p_attr = physical_edges(gh, k_physical, symmetric, image_size)
    p_index, p_attr = p_index.to(tokens.device), p_attr.to(tokens.device)
    long = dict(dtype=torch.long, device=tokens.device)
    return GraphSpec(
        edge_index=torch.cat([f_index, p_index], dim=1),
        edge_attr=torch.cat([f_attr, p_attr]).unsqueeze(1).float(),
        edge_type=torch.cat(
            [
                torch.full((f_index.shape[1],), FEATURE_EDGE, **long),
                torch.full((p_index.shape[1],), PHYSICAL_EDGE, **long),
            ]
        ),
        num_nodes=n,
    )


def status_one_hot(status: torch.Tensor) -> torch.Tensor:
    """One-hot encoding of prompt states (the status part of the node features).

    Args:
        status: ``(..., N)`` integer status, ``0`` inactive, ``1`` positive, ``2`` negative.

    Returns:
        ``(..., N, 3)`` float32.
    """
    status = status.long()
    if status.numel() and (status.min() < 0 or status.max() >= NUM_STATUS):
        raise ValueError("status: expected values in {0, 1, 2} (inactive, positive, negative)")
    return F.one_hot(status, NUM_STATUS).float()


def static_node_features(tokens: torch.Tensor, positions_norm: torch.Tensor) -> torch.Tensor:
    """Status-independent part of the node features (computed once per image by :class:`PromptEnv`).

    Args:
        tokens: ``(G, G, C)`` or ``(N, C)`` tokens.
        positions_norm: ``(N, 2)`` normalised ``(x, y)``, see :func:`normalised_positions`.

    Returns:
        ``(N, C + 2)`` float32 = ``[L2-normalised token, x, y]``.
    """
    feats = tokens.reshape(-1, tokens.shape[-1]).float()
    if positions_norm.shape != (feats.shape[0], 2):
        raise ValueError(
            f"positions_norm: expected shape ({feats.shape[0]}, 2) to match the tokens, got {tuple(positions_norm.shape)}"
        )
    return torch.cat([F.normalize(feats, dim=1), positions_norm.to(feats)], dim=1)
