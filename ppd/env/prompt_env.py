"""Batched prompt environment: B images, per-node prompt status, SAM (on cached embeddings) as the judge.

State per image: ``status (N,)`` with ``0`` inactive, ``1`` active positive, ``2`` active negative over the
``G x G`` node grid. Attacker action ``a in [0, 2N)`` activates node ``a // 2`` as positive (``a % 2 == 0``)
or negative; defender action ``a in [0, N)`` deactivates node ``a``. After every action the active prompts go
through SAM's prompt encoder + mask decoder on the cached image embedding, and the reward is the change of
Dice against the ground truth on SAM's 256x256 low-resolution logits (defender ``+ΔDice``, attacker
``-ΔDice``; paper eqs. 4 and 6).

Corner cases (tested): no active prompt → empty prediction (SAM is not called); empty GT and empty
prediction → Dice 1; an image whose valid actions are exhausted (all nodes active for the attacker, none
active for the defender) is ``done``; an invalid action raises ``ValueError``.
"""

from __future__ import annotations

import time
from collections import OrderedDict, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch_geometric.data import Batch, Data

from ppd.env.decoders import Decoder, build_decoder
from ppd.env.graph import (
    GraphSpec,
    build_graph,
    node_positions,
    normalised_positions,
    pool_tokens,
    static_node_features,
    status_one_hot,
)
from ppd.env.roles import ATTACK, DEFEND, Role, get_role
from ppd.env.scores import SAM_NODE_FEATURES, dice_score, sam_node_features
from ppd.models.dense_graphs import DenseGraphs, dense_graphs
from ppd.models.sam import gt_to_low_res, to_input_frame
from ppd.models.sam_cached import ImageSideCache, image_side_cache
from ppd.types import INACTIVE, NEGATIVE, POSITIVE, CachedFeatures

__all__ = [
    "INACTIVE",
    "NEGATIVE",
    "POSITIVE",
    "SAM_NODE_FEATURES",
    "PromptEnv",
    "StepResult",
    "dice_score",
    "sam_node_features",
]


@dataclass
class EnvImage:
    """Per-image static data, built once from cached features and the GT mask."""

    features: CachedFeatures
    gt_low: torch.Tensor  # (h4, w4) bool
    graph: GraphSpec
    x_static: torch.Tensor  # (N, C + 2) normalised tokens + normalised positions
    points_input: torch.Tensor  # (N, 2) node centres in SAM's input frame
    embedding: torch.Tensor  # (1, 256, 64, 64) float32


@dataclass
class StepResult:
    """Result of one batched step.

    Attributes:
        reward: ``(B,)`` float32 (already sign-flipped for the attacker).
        dice: ``(B,)`` Dice after the step.
        done: ``(B,)`` bool, budget reached or no valid action left.
    """

    reward: torch.Tensor
    dice: torch.Tensor
    done: torch.Tensor


@dataclass
class Timings:
    """Accumulated wall time (s) per phase, for benchmarks."""

    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def add(self, name: str, dt: float, n: int = 1) -> None:
        self.seconds[name] += dt
        self.calls[name] += n


class PromptEnv:
    """Batched prompt environment over a pool of images.

    Args:
        sam: SAM model (only its prompt encoder and mask decoder are used).
        features: cached features per image id.
        masks: GT masks ``(H, W)`` bool per image id.
        grid: node grid side ``G`` (DINOv2 tokens are average-pooled to it when they differ).
        k_feature: neighbours of the feature relation.
        k_physical: neighbours of the physical relation.
        symmetric: add reverse edges.
        decode_chunk: at most this many prompt sets *with the same number of active points* per SAM decoder
            call (1 = loop; batching gains ~15% per set on a 2-core CPU).
        budget_range: ``(low, high)`` inclusive range of per-episode step budgets.
        decoder_backend: ``"torch"`` (eager, any device) or ``"onnx"`` (SAM's mask decoder exported to ONNX
            Runtime, CPU only, ~2x faster per decode on CPU; see :mod:`ppd.models.sam_onnx`);
            ``"torch_cached"`` / ``"onnx_cached"``: the same with the decoder's prompt-independent image side
            computed once per image (:mod:`ppd.models.sam_cached`; exact up to float rounding).
        image_cache_size: images whose decoder image-side cache is kept (least recently used first out;
            ~6.3 MB each for SAM) by the ``*_cached`` backends.
        decoder: a ready :class:`~ppd.env.decoders.Decoder` (default: built once from ``decoder_backend``).
    """

    def __init__(
        self,
        sam: torch.nn.Module,
        features: Sequence[CachedFeatures],
        masks: Sequence[np.ndarray],
        grid: int = 16,
        k_feature: int = 8,
        k_physical: int = 8,
        symmetric: bool = True,
        decode_chunk: int = 1,
        budget_range: tuple[int, int] = (50, 300),
        decoder_backend: str = "torch",
        image_cache_size: int = 64,
        decoder: Decoder | None = None,
    ) -> None:
        if len(features) != len(masks):
            raise ValueError(f"{len(features)} feature entries but {len(masks)} masks")
        if budget_range[0] < 1 or budget_range[1] < budget_range[0]:
            raise ValueError(f"budget_range must be 1 <= low <= high, got {budget_range}")
        self.sam = sam
        self.features = list(features)
        self.masks = list(masks)
        self.grid = grid
        self.num_nodes = grid * grid
        self.k_feature = k_feature
        self.k_physical = k_physical
        self.symmetric = symmetric
        self.decode_chunk = max(1, decode_chunk)
        self.budget_range = budget_range
        self.decoder_backend = decoder_backend
        self.decoder: Decoder = decoder if decoder is not None else build_decoder(sam, decoder_backend)
        self.image_cache_size = max(1, image_cache_size)
        self._side: OrderedDict[int, ImageSideCache] = OrderedDict()
        self._images: dict[int, EnvImage] = {}
        self._static: DenseGraphs | None = None
        self.timings = Timings()
        # batch state
        self.image_ids = torch.zeros(0, dtype=torch.long)
        self.status = torch.zeros(0, self.num_nodes, dtype=torch.long)
        self.dice = torch.zeros(0)
        self.steps = torch.zeros(0, dtype=torch.long)
        self.budget = torch.zeros(0, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.features)

    # -- static per-image data ------------------------------------------------------------------
    def image(self, image_id: int) -> EnvImage:
        """Static data of one image (built on first use and kept)."""
        if image_id not in self._images:
            t0 = time.perf_counter()
            f = self.features[image_id]
            mask = np.asarray(self.masks[image_id], dtype=bool)
            if mask.shape != tuple(f.original_size):
                raise ValueError(
                    f"image {image_id}: mask size {mask.shape} != cached original size {f.original_size}"
                )
            tokens = pool_tokens(f.dino_tokens.float(), self.grid)
            spec = build_graph(
                tokens, k_feature=self.k_feature, k_physical=self.k_physical, symmetric=self.symmetric
            )
            x_static = static_node_features(tokens, normalised_positions(self.grid))
            h, w = f.original_size
            pts = to_input_frame(node_positions(self.grid, h, w), f.original_size)
            self._images[image_id] = EnvImage(
                features=f,
                gt_low=gt_to_low_res(mask, f.input_size),
                graph=spec,
                x_static=x_static,
                points_input=pts,
                embedding=f.sam_embedding.float()[None],
            )
            self.timings.add("graph", time.perf_counter() - t0)
        return self._images[image_id]

    def static_graphs(self) -> DenseGraphs:
        """Static per-image Q-network inputs of the whole pool, stacked once (the dense observations).

        A batch of states is then just ``(image ids (B,), status (B, N))``, with no PyG ``Data`` / ``Batch``.

        Returns:
            :class:`~ppd.models.dense_graphs.DenseGraphs` with ``x_static (I, N, C + 2)`` (the first
            ``C + 2`` columns of :meth:`observe`'s ``x``) and both relations' degree-padded neighbour tables,
            on the CPU.
        """
        if self._static is None:
            t0 = time.perf_counter()
            imgs = [self.image(i) for i in range(len(self))]
            self._static = dense_graphs(
                [im.x_static for im in imgs],
                [im.graph.edge_index for im in imgs],
                [im.graph.edge_attr for im in imgs],
                [im.graph.edge_type for im in imgs],
                num_relations=2,
            )
            self.timings.add("static", time.perf_counter() - t0)
        return self._static

    # -- SAM as judge ---------------------------------------------------------------------------
    @torch.inference_mode()
    def image_side(self, image_id: int) -> ImageSideCache:
        """The decoder's prompt-independent image side of one image (LRU-cached, on SAM's device)."""
        side = self._side.get(image_id)
        if side is None:
            t0 = time.perf_counter()
            emb = self.image(image_id).embedding.to(self.sam.device, torch.float32)
            side = image_side_cache(self.sam.mask_decoder, self.sam.prompt_encoder, emb)
            self._side[image_id] = side
            while len(self._side) > self.image_cache_size:
                self._side.popitem(last=False)
            self.timings.add("image_side", time.perf_counter() - t0)
        else:
            self._side.move_to_end(image_id)
        return side

    @torch.inference_mode()
    def low_res_logits(self, image_ids: torch.Tensor, status: torch.Tensor) -> torch.Tensor:
        """SAM low-res logits for B prompt states; ``-inf`` where no prompt is active.

        Args:
            image_ids: ``(B,)``.
            status: ``(B, N)``.

        Returns:
            ``(B, 256, 256)`` float32 logits.
        """
        b = status.shape[0]
        out = torch.full((b, 256, 256), float("-inf"))
        active = status > 0
        counts = active.sum(1)
        # SAM's decoder attends over every prompt token, padding tokens (label -1) included: a prompt set
        # padded to a longer one gets (slightly) different logits. So that a state's reward never depends on
        # the other states it happens to be batched with, only sets with the same number of active points
        # share a decoder call (each then carries exactly SAM's own single padding point).
        chunks: list[list[int]] = []
        for k in counts.unique().tolist():
            if k == 0:
                continue
            rows = (counts == k).nonzero().squeeze(1).tolist()
            chunks += [rows[s : s + self.decode_chunk] for s in range(0, len(rows), self.decode_chunk)]
        for chunk in chunks:
            k = int(counts[chunk[0]])
            pts = torch.zeros(len(chunk), k, 2)
            lab = torch.full((len(chunk), k), -1, dtype=torch.long)
            embs, sides = [], []
            for j, i in enumerate(chunk):
                img = self.image(int(image_ids[i]))
                idx = active[i].nonzero().squeeze(1)
                pts[j, : len(idx)] = img.points_input[idx]
                lab[j, : len(idx)] = (status[i, idx] == POSITIVE).long()
                if self.decoder.cached:
                    sides.append(self.image_side(int(image_ids[i])))
                else:
                    embs.append(img.embedding)
            t0 = time.perf_counter()
            image = ImageSideCache.cat(sides) if self.decoder.cached else torch.cat(embs)
            logits, _ = self.decoder.decode(image, pts, lab)
            self.timings.add("decode", time.perf_counter() - t0, len(chunk))
            out[chunk] = logits[:, 0].float().cpu()  # env state lives on the CPU; SAM may be on a GPU
        return out

    def dice_of(self, image_ids: torch.Tensor, status: torch.Tensor) -> torch.Tensor:
        """Low-resolution Dice of B prompt states against their GT.

        Args:
            image_ids: ``(B,)``.
            status: ``(B, N)``.

        Returns:
            ``(B,)`` float32.
        """
        return self.dice_of_logits(image_ids, self.low_res_logits(image_ids, status))

    def dice_of_logits(self, image_ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Low-resolution Dice of B states' logits ``(B, 256, 256)`` (:meth:`low_res_logits`) -> ``(B,)``."""
        t0 = time.perf_counter()
        dice = torch.empty(logits.shape[0])
        for i in range(logits.shape[0]):
            img = self.image(int(image_ids[i]))
            h4, w4 = img.gt_low.shape
            dice[i] = dice_score((logits[i, :h4, :w4] > 0)[None], img.gt_low[None])[0]
        self.timings.add("dice", time.perf_counter() - t0, logits.shape[0])
        return dice

    def sam_features_of_logits(self, image_ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """:func:`sam_node_features` of B states' logits ``(B, 256, 256)`` -> ``(B, N, 3)``."""
        out = torch.empty(logits.shape[0], self.num_nodes, len(SAM_NODE_FEATURES))
        for i in range(logits.shape[0]):
            img = self.image(int(image_ids[i]))
            out[i] = sam_node_features(logits[i : i + 1], tuple(img.gt_low.shape), self.grid)[0]
        return out

    def sam_features(self, image_ids: torch.Tensor, status: torch.Tensor) -> torch.Tensor:
        """Per-node inputs from SAM's prediction of B states (one decode each): ``(B, N, 3)``.

        Needs no GT: the valid low-res frame comes from the cached input size (inference-safe).
        """
        return self.sam_features_of_logits(image_ids, self.low_res_logits(image_ids, status))

    # -- episode control ------------------------------------------------------------------------
    def sample_budgets(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``(n,)`` step budgets drawn uniformly from ``budget_range`` (inclusive)."""
        lo, hi = self.budget_range
        return torch.randint(lo, hi + 1, (n,), generator=generator)

    def reset(
        self,
        image_ids: torch.Tensor | Sequence[int],
        status: torch.Tensor,
        budget: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Start B episodes from given prompt states.

        Args:
            image_ids: ``(B,)`` image ids.
            status: ``(B, N)`` start states.
            budget: ``(B,)`` step budgets (default: sampled from ``budget_range``).
            generator: RNG for the budgets.

        Returns:
            ``(B,)`` Dice of the start states.
        """
        self.image_ids = torch.as_tensor(image_ids, dtype=torch.long).clone()
        if status.shape != (len(self.image_ids), self.num_nodes):
            raise ValueError(
                f"status must be (B, N) = ({len(self.image_ids)}, {self.num_nodes}), got {tuple(status.shape)}"
            )
        self.status = status.long().clone()
        self.steps = torch.zeros(len(self.image_ids), dtype=torch.long)
        self.budget = (
            budget.long().clone()
            if budget is not None
            else self.sample_budgets(len(self.image_ids), generator)
        )
        self.dice = self.dice_of(self.image_ids, self.status)
        return self.dice.clone()

    def _finish(self, new_status: torch.Tensor, sign: float, active: torch.Tensor) -> StepResult:
        new_dice = self.dice.clone()
        if bool(active.any()):
            idx = active.nonzero().squeeze(1)
            new_dice[idx] = self.dice_of(self.image_ids[idx], new_status[idx])
        reward = sign * (new_dice - self.dice)
        self.status = new_status
        self.dice = new_dice
        self.steps = self.steps + active.long()
        return StepResult(reward=reward, dice=new_dice.clone(), done=self.done)

    @property
    def done(self) -> torch.Tensor:
        """``(B,)`` bool: budget used up (validity of further actions is checked per role)."""
        return self.steps >= self.budget

    def step(self, role: Role | str, actions: torch.Tensor, active: torch.Tensor | None = None) -> StepResult:
        """Apply one action per episode of a role (:meth:`Role.apply`) and judge the new states.

        Args:
            role: :data:`~ppd.env.roles.ATTACK` (activate node ``a // 2`` as positive if ``a % 2 == 0`` else
                negative) or :data:`~ppd.env.roles.DEFEND` (deactivate node ``a``), or its name.
            actions: ``(B,)`` long flat actions.
            active: ``(B,)`` bool, which episodes act (default: all not done). Others are unchanged, reward 0.

        Returns:
            :class:`StepResult` with reward ``role.reward_sign * (Dice_after - Dice_before)``.

        Raises:
            ValueError: an acting episode's action is not valid in its state.
        """
        role = get_role(role)
        active = ~self.done if active is None else active.clone()
        new = role.apply(self.status, actions, active)
        return self._finish(new, role.reward_sign, active)

    def step_attack(self, actions: torch.Tensor, active: torch.Tensor | None = None) -> StepResult:
        """:meth:`step` of the attacker."""
        return self.step(ATTACK, actions, active)

    def step_defend(self, actions: torch.Tensor, active: torch.Tensor | None = None) -> StepResult:
        """:meth:`step` of the defender."""
        return self.step(DEFEND, actions, active)

    # -- observations ---------------------------------------------------------------------------
    def observe(
        self,
        image_ids: torch.Tensor | None = None,
        status: torch.Tensor | None = None,
        extra: torch.Tensor | None = None,
    ) -> Batch:
        """PyG batch of Q-network inputs for B states (default: the current batch state).

        Each graph has ``x (N, C + 2 + 3 [+ F])`` = [L2-normalised token, x, y, one-hot status, extra],
        ``edge_index (2, E)``, ``edge_attr (E, 1)``, ``edge_type (E,)``, and the action masks
        ``attack_mask (N, 2)`` and ``defend_mask (N,)``.

        Args:
            image_ids: ``(B,)``.
            status: ``(B, N)``.
            extra: ``(B, N, F)`` state-dependent node inputs appended last (e.g. :meth:`sam_features`).
        """
        image_ids = self.image_ids if image_ids is None else image_ids
        status = self.status if status is None else status
        t0 = time.perf_counter()
        data = []
        onehot = status_one_hot(status)
        for i in range(len(image_ids)):
            img = self.image(int(image_ids[i]))
            parts = [img.x_static, onehot[i]] if extra is None else [img.x_static, onehot[i], extra[i]]
            data.append(
                Data(
                    x=torch.cat(parts, dim=-1),
                    edge_index=img.graph.edge_index,
                    edge_attr=img.graph.edge_attr,
                    edge_type=img.graph.edge_type,
                    attack_mask=ATTACK.node_mask(status[i]).clone(),
                    defend_mask=DEFEND.node_mask(status[i]).squeeze(-1),
                    num_nodes=self.num_nodes,
                )
            )
        batch = Batch.from_data_list(data)
        self.timings.add("observe", time.perf_counter() - t0, len(image_ids))
        return batch

    def full_resolution_mask(self, image_id: int, status: torch.Tensor) -> torch.Tensor:
        """Boolean mask ``(H, W)`` at original resolution for one state (empty when nothing is active)."""
        from ppd.models.sam import upscale_logits

        img = self.image(image_id)
        logits = self.low_res_logits(torch.tensor([image_id]), status[None])
        if torch.isinf(logits).all():
            return torch.zeros(img.features.original_size, dtype=torch.bool)
        up = upscale_logits(logits[:, None], img.features.input_size, img.features.original_size)
        return up[0, 0] > 0


#: graph keys an env config must hold (``symmetric`` is optional, default True)
ENV_GRAPH_KEYS: tuple[str, ...] = ("grid", "k_feature", "k_physical")


def build_env(
    sam: torch.nn.Module,
    features: Sequence[CachedFeatures],
    masks: Sequence[np.ndarray],
    env_config: dict,
    **options: object,
) -> PromptEnv:
    """The one way to build a :class:`PromptEnv` from an env config (a defender's, a data module's, an eval's).

    Args:
        sam: SAM model.
        features: cached features per image id.
        masks: GT masks per image id.
        env_config: at least ``grid``, ``k_feature``, ``k_physical`` (``symmetric`` optional).
        **options: other :class:`PromptEnv` arguments (``decode_chunk``, ``budget_range``,
            ``decoder_backend``).

    Raises:
        ValueError: a graph key is missing (names the keys present).
    """
    missing = [k for k in ENV_GRAPH_KEYS if k not in env_config]
    if missing:
        raise ValueError(f"env config lacks {missing} (got keys {sorted(env_config)})")
    return PromptEnv(
        sam,
        features,
        masks,
        grid=int(env_config["grid"]),
        k_feature=int(env_config["k_feature"]),
        k_physical=int(env_config["k_physical"]),
        symmetric=bool(env_config.get("symmetric", True)),
        **options,  # type: ignore[arg-type]
    )
