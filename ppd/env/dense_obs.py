"""Observations without per-step graph objects: per-image static tensors + status.

A PPD observation is ``(image id, status (N,))``: the kNN topology, the edge distances and the
status-independent node features of an image never change during training. :func:`static_graphs` stacks
them once for an environment's whole image pool into :class:`~ppd.models.qnet_dense.DenseGraphs`; a batch
of B states is then just ``(image_ids (B,), status (B, N))`` (indexing + a status one-hot inside
:meth:`~ppd.models.qnet_dense.DenseQNetwork.forward_dense`), with no ``Data``/``Batch.from_data_list``.
Action masks are plain functions of the status (:meth:`ppd.env.roles.Role.mask`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ppd.models.qnet_dense import DenseGraphs, dense_graphs

if TYPE_CHECKING:
    from ppd.env.prompt_env import PromptEnv

__all__ = ["static_graphs"]


def static_graphs(env: PromptEnv) -> DenseGraphs:
    """Per-image static Q-network inputs of every image of ``env`` (built once; the env caches it).

    Args:
        env: the environment (its per-image graphs are built here if not yet).

    Returns:
        :class:`DenseGraphs` with ``x_static (I, N, C + 2)`` (L2-normalised token, normalised x, y — the
        same values as the first ``C + 2`` columns of :meth:`PromptEnv.observe`'s ``x``) and both relations'
        degree-padded neighbour tables, on the CPU.
    """
    imgs = [env.image(i) for i in range(len(env))]
    return dense_graphs(
        [im.x_static for im in imgs],
        [im.graph.edge_index for im in imgs],
        [im.graph.edge_attr for im in imgs],
        [im.graph.edge_type for im in imgs],
        num_relations=2,
    )
