"""Inference with a trained defender: refine any set of point prompts, then let SAM predict the mask.

Usage::

    from ppd import PromptDefender
    defender = PromptDefender.from_checkpoint("runs/quickstart/checkpoints/last.ckpt")
    out = defender.refine(image, points, labels)        # image (H, W, 3) uint8, points (K, 2) (x, y) pixels
    out.mask, out.points, out.labels, out.removed

Stopping rule (the paper's inference procedure, DESIGN.md section 6): starting from the given prompt state,
the defender repeatedly evaluates its Q-values over the *active* nodes and deactivates the node with the
highest value **while that best value is strictly positive** (a positive expected Dice gain). It stops as
soon as

1. the best Q-value of a valid action is ``<= 0``, or
2. the step budget is used up (``max_steps``: argument, else ``env_config["max_steps"]`` of the defender
   file when present, else unlimited), or
3. no active prompt is left.

The loop itself is :func:`ppd.rl.rollout.greedy_defence`, the one implementation of this rule: training-time
validation, :class:`PromptDefender`, the evaluation harness and ``ppd.predict`` all call it, with the defender
as a :class:`~ppd.rl.agent.DQNAgent` on the dense Q path (as in training). It only needs the Q-network (and,
for defenders trained with ``sam_inputs``, one decode per step): SAM is called once, after the loop, for the
final mask.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ppd.data.features import FeatureCache
from ppd.env.prompt_env import ENV_GRAPH_KEYS, PromptEnv, build_env
from ppd.env.prompts import click_prompts, status_to_points
from ppd.rl.agent import DQNAgent, as_agent
from ppd.rl.rollout import DefenceTrace, greedy_defence
from ppd.types import CachedFeatures

log = logging.getLogger(__name__)

__all__ = ["DefenceTrace", "PromptDefender", "RefinedPrompts", "greedy_defence", "mask_dice_iou"]


def mask_dice_iou(pred: np.ndarray | torch.Tensor, gt: np.ndarray | torch.Tensor) -> tuple[float, float]:
    """Dice and IoU of one predicted mask against its ground truth, at the resolution given.

    Computed with ``torchmetrics`` (binary F1 = Dice, binary Jaccard = IoU). Corner case (project rule):
    an empty GT with an empty prediction scores 1 for both (``zero_division=1``).

    Args:
        pred: ``(H, W)`` bool prediction.
        gt: ``(H, W)`` bool ground truth.

    Returns:
        ``(dice, iou)`` floats in ``[0, 1]``.
    """
    from torchmetrics.functional.classification import binary_f1_score, binary_jaccard_index

    p = torch.as_tensor(np.asarray(pred)).bool()
    g = torch.as_tensor(np.asarray(gt)).bool()
    if p.shape != g.shape or p.dim() != 2:
        raise ValueError(f"prediction {tuple(p.shape)} and GT {tuple(g.shape)} must be the same (H, W)")
    p, g = p.reshape(-1).long(), g.reshape(-1).long()
    dice = binary_f1_score(p, g, zero_division=1.0, validate_args=False)
    iou = binary_jaccard_index(p, g, zero_division=1.0, validate_args=False)
    return float(dice), float(iou)


@dataclass
class RefinedPrompts:
    """Output of :meth:`PromptDefender.refine`.

    All points are node centres ``(x, y)`` in original-image pixels (clicks are snapped to the node grid).

    Attributes:
        points: ``(K, 2)`` float32 kept prompts.
        labels: ``(K,)`` int64 kept labels (1 positive, 0 negative).
        removed: ``(R, 2)`` float32 prompts the defender deactivated.
        removed_labels: ``(R,)`` int64 labels of the removed prompts.
        mask: ``(H, W)`` bool SAM mask of the kept prompts at original resolution (empty if none is kept).
        dice_if_gt: Dice of ``mask`` against the GT at original resolution when a GT was given, else None.
        steps: number of deactivations.
        q_values: best valid Q-value before each decision (see :class:`DefenceTrace`).
        stop_reason: ``"q<=0"``, ``"budget"`` or ``"no_active_prompt"``.
        start_status: ``(N,)`` node states before refinement.
        status: ``(N,)`` node states after refinement.
    """

    points: np.ndarray
    labels: np.ndarray
    removed: np.ndarray
    removed_labels: np.ndarray
    mask: np.ndarray
    dice_if_gt: float | None
    steps: int
    q_values: list[float] = field(default_factory=list)
    stop_reason: str = ""
    start_status: torch.Tensor | None = None
    status: torch.Tensor | None = None


#: registry name of the pretrained defender; ``--defender pretrained`` / ``defender: pretrained`` select it
PRETRAINED_NAME = "ppd_defender"
PRETRAINED_ALIASES = ("pretrained", PRETRAINED_NAME)


def resolve_defender(spec: str | Path) -> Path:
    """The defender file meant by ``spec``: ``"pretrained"`` (or ``"ppd_defender"``) is the shipped defender
    (resolved and sha256-verified by :func:`ppd.weights.resolve`), anything else a path, returned as given.
    """
    if str(spec) in PRETRAINED_ALIASES and not Path(str(spec)).exists():
        from ppd.weights import resolve

        return resolve(PRETRAINED_NAME)
    return Path(spec)


class PromptDefender:
    """A trained PPD defender plus SAM: refines point prompts and predicts the mask.

    Args:
        agent: the defender agent, or a bare defender Q-network (wrapped by :func:`~ppd.rl.agent.as_agent`
            into a dense agent); put in eval mode.
        env_config: graph / feature set-up the defender was trained with (``grid``, ``k_feature``,
            ``k_physical``, ``sam_variant``, ``dino_name``, ``dino_resolution``, ...).
        sam: SAM model used for the final mask (prompt encoder + mask decoder on cached embeddings).
        cache: feature cache (SAM embedding + DINOv2 tokens, computed on a miss).
        max_steps: step budget (``None`` = ``env_config.get("max_steps")``, else unlimited).
        decoder_backend: SAM mask-decoder backend of the environments, ``"torch"`` or ``"onnx"`` (CPU).
        keep_last_positive: never remove the last positive prompt (see :func:`greedy_defence`).
    """

    def __init__(
        self,
        agent: DQNAgent | nn.Module,
        env_config: dict[str, Any],
        sam: nn.Module,
        cache: FeatureCache,
        max_steps: int | None = None,
        decoder_backend: str = "torch",
        keep_last_positive: bool = True,
    ) -> None:
        missing = [k for k in ENV_GRAPH_KEYS if k not in env_config]
        if missing:
            raise ValueError(f"defender env_config lacks {missing} (got keys {sorted(env_config)})")
        if max_steps is not None and max_steps < 0:
            raise ValueError(f"max_steps must be None or >= 0, got {max_steps}")
        self.agent = as_agent(agent, "defend").eval()
        self.env_config = dict(env_config)
        self.sam = sam
        self.cache = cache
        default = self.env_config.get("max_steps")
        self.max_steps: int | None = max_steps if max_steps is not None else default
        self.decoder_backend = decoder_backend
        self.keep_last_positive = keep_last_positive

    @property
    def sam_inputs(self) -> bool:
        """Whether the defender reads SAM's current prediction as node inputs (``env_config["sam_inputs"]``)."""
        return bool(self.env_config.get("sam_inputs", False))

    @property
    def min_q(self) -> float:
        """Stop threshold of the defence loop (``env_config["min_q"]``, default 0: remove while Q > 0)."""
        return float(self.env_config.get("min_q", 0.0))

    @property
    def grid(self) -> int:
        """Node grid side ``G``."""
        return int(self.env_config["grid"])

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        sam: nn.Module | None = None,
        cache: FeatureCache | None = None,
        device: str = "cpu",
        max_steps: int | None = None,
        cache_root: str | Path | None = None,
        decoder_backend: str = "torch",
        keep_last_positive: bool = True,
    ) -> PromptDefender:
        """Load an exported defender (``python -m ppd.export``) or a PPD training checkpoint.

        Args:
            path: defender file or training checkpoint; ``"pretrained"`` = the shipped defender.
            sam: SAM for the final mask; default: the SAM of the cache's image encoder (so embeddings and
                decoder come from the same weights).
            cache: feature cache; default: a :class:`FeatureCache` with the defender's encoders
                (``sam_variant``, ``dino_name``, ``dino_resolution``) under ``cache_root``.
            device: device of the encoders / SAM built here.
            max_steps: step budget override.
            cache_root: root of the default cache (``None`` = ``$PPD_CACHE/features``).
            decoder_backend: ``"torch"`` or ``"onnx"`` (SAM mask decoder in ONNX Runtime, CPU only).
            keep_last_positive: never remove the last positive prompt.

        Raises:
            ValueError: the given cache was filled by other encoders than the defender was trained with.
        """
        from ppd.export import load_defender

        path = resolve_defender(path)
        agent, env_config = load_defender(path)
        want = {k: env_config[k] for k in ("sam_variant", "dino_name", "dino_resolution") if k in env_config}
        if cache is None:
            tiny = want.get("dino_name") == "tiny"
            cache = FeatureCache(
                root=None if cache_root is None else str(cache_root),
                device=device,
                dino_pretrained=not tiny,
                sam_checkpoint=None if want.get("sam_variant") == "tiny" else "default",
                **want,
            )
        else:
            got = {k: getattr(cache.config, k) for k in want}
            if got != want:
                raise ValueError(f"defender {path} was trained with encoders {want} but the cache uses {got}")
        if sam is None:
            sam = cache.sam_encoder.sam
        return cls(
            agent,
            env_config,
            sam.to(device).eval(),
            cache,
            max_steps=max_steps,
            decoder_backend=decoder_backend,
            keep_last_positive=keep_last_positive,
        )

    @classmethod
    def from_pretrained(cls, name: str = PRETRAINED_NAME, **kwargs: Any) -> PromptDefender:
        """The pretrained defender shipped with ppd (``ppd_defender``, see ``docs/defender.md``).

        The file is resolved through :func:`ppd.weights.resolve` (``PPD_WEIGHTS_PPD_DEFENDER`` overrides
        it) and verified against its pinned sha256. It carries its own inference settings (step rule,
        last-positive rule, feature-matching options); keyword arguments are those of
        :meth:`from_checkpoint` (``max_steps`` overrides the stored step rule).

        Args:
            name: registry name of the defender.
            **kwargs: passed on to :meth:`from_checkpoint`.
        """
        from ppd.weights import resolve

        return cls.from_checkpoint(resolve(name), **kwargs)

    # -- environments -------------------------------------------------------------------------------
    def make_env(
        self, features: Sequence[CachedFeatures], masks: Sequence[np.ndarray] | None = None
    ) -> PromptEnv:
        """A :class:`PromptEnv` with the defender's graph set-up (GT masks default to empty ones)."""
        if masks is None:
            masks = [np.zeros(f.original_size, dtype=bool) for f in features]
        return build_env(self.sam, features, masks, self.env_config, decoder_backend=self.decoder_backend)

    def features(self, image: np.ndarray) -> CachedFeatures:
        """Cached features of an ``(H, W, 3)`` uint8 image (encoders run on a cache miss)."""
        if not (
            isinstance(image, np.ndarray)
            and image.ndim == 3
            and image.shape[2] == 3
            and image.dtype == np.uint8
        ):
            got = f"{type(image).__name__} {getattr(image, 'shape', '')} {getattr(image, 'dtype', '')}"
            raise ValueError(f"image must be an (H, W, 3) uint8 RGB array, got {got}")
        return self.cache.get(image)

    # -- refinement ---------------------------------------------------------------------------------
    def refine(
        self,
        image: np.ndarray,
        points: np.ndarray | Sequence[Sequence[float]],
        labels: np.ndarray | Sequence[int],
        gt_mask: np.ndarray | None = None,
    ) -> RefinedPrompts:
        """Refine a user's point prompts on one image.

        Points are snapped to the nearest node centre of the ``G x G`` grid (:func:`click_prompts`).
        Several clicks on the same node become one prompt, and the *last* of them sets its label.

        Args:
            image: ``(H, W, 3)`` uint8 RGB.
            points: ``(K, 2)`` clicks ``(x, y)`` in pixels, inside ``[0, W] x [0, H]``.
            labels: ``(K,)`` 1 positive / 0 negative.
            gt_mask: optional ``(H, W)`` bool GT, only used to report ``dice_if_gt``.

        Returns:
            :class:`RefinedPrompts`.
        """
        feats = self.features(image)
        h, w = feats.original_size
        pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        status = click_prompts(pts, np.asarray(labels).reshape(-1), self.grid, h, w)
        return self.refine_status(feats, status, gt_mask)

    def refine_status(
        self, features: CachedFeatures, status: torch.Tensor, gt_mask: np.ndarray | None = None
    ) -> RefinedPrompts:
        """Refine a prompt state given directly on the node grid.

        Args:
            features: the image's cached features.
            status: ``(N,)`` node states, ``N = G * G``.
            gt_mask: optional ``(H, W)`` bool GT for ``dice_if_gt``.

        Returns:
            :class:`RefinedPrompts`.
        """
        n = self.grid * self.grid
        status = torch.as_tensor(status).long()
        if status.shape != (n,):
            raise ValueError(f"status must be (N,) = ({n},) for grid {self.grid}, got {tuple(status.shape)}")
        env = self.make_env([features])
        trace = greedy_defence(
            env,
            self.agent,
            [0],
            status[None],
            self.max_steps,
            self.keep_last_positive,
            self.sam_inputs,
            self.min_q,
        )
        return self.result(env, 0, status, trace, 0, gt_mask)

    def result(
        self,
        env: PromptEnv,
        image_id: int,
        start: torch.Tensor,
        trace: DefenceTrace,
        row: int,
        gt_mask: np.ndarray | None = None,
    ) -> RefinedPrompts:
        """Assemble :class:`RefinedPrompts` for row ``row`` of a :class:`DefenceTrace` (one SAM decode)."""
        final = trace.status[row]
        h, w = env.features[image_id].original_size
        pts, lab = status_to_points(final, self.grid, h, w)
        removed_status = torch.where(final == 0, start, torch.zeros_like(start))
        rpts, rlab = status_to_points(removed_status, self.grid, h, w)
        mask = env.full_resolution_mask(image_id, final).numpy()
        dice = None
        if gt_mask is not None:
            dice = mask_dice_iou(mask, gt_mask)[0]
        return RefinedPrompts(
            points=pts.numpy().astype(np.float32),
            labels=lab.numpy().astype(np.int64),
            removed=rpts.numpy().astype(np.float32),
            removed_labels=rlab.numpy().astype(np.int64),
            mask=mask,
            dice_if_gt=dice,
            steps=int(trace.steps[row]),
            q_values=list(trace.q_values[row]),
            stop_reason=trace.stop_reason[row],
            start_status=start.clone(),
            status=final.clone(),
        )
