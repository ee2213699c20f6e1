"""``ProxyPromptTask``: trains the Proxy Prompt Generator against a frozen SAM mask decoder (Dice loss).

Batches come from :class:`ppd.data.segmentation.SegmentationDataModule` with ``support_size = K``:
``embedding (B, 256, 64, 64)``, ``gt_low``/``valid (B, 1, 256, 256)``, ``support_embedding
(B, K, 256, 64, 64)``, ``support_gt_low (B, K, 1, 256, 256)``. The generator turns the support pairs and the
target embedding into sparse prompt tokens; SAM's (frozen) mask decoder turns them into low-res logits;
the loss is the soft Dice loss on the valid part of the low-res frame (paper: Dice, SGD momentum 0.9,
lr 0.01, weight decay 5e-4).

SAM stays frozen. ``lora_rank > 0`` adds LoRA adapters (peft) to the attention projections of SAM's mask
decoder (the paper also adapts the image encoder; with cached embeddings the encoder never runs here, see
docs/proxy_prompt.md). Checkpoints hold the generator, any LoRA weights and ``checkpoint["proxy_prompt"]``
(generator config, SAM variant, LoRA settings) -- not the frozen SAM weights, which are rebuilt from
``sam_variant``/``sam_checkpoint``.
"""

from __future__ import annotations

import zlib
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import nn

from ppd.models.proxy_prompt import ProxyPromptConfig, ProxyPromptGenerator, generate_and_decode
from ppd.models.sam import LOW_RES, gt_to_low_res, low_res_valid_size

#: attention projections of segment-anything's TwoWayTransformer (LoRA targets)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def draw_support(pool: list[str], stem: str, k: int, seed: int) -> list[int]:
    """Indices of ``k`` support pairs in ``pool`` for target ``stem`` (never the target itself).

    Deterministic in ``(seed, stem)``: the same image gets the same support in every run and process.

    Raises:
        ValueError: the pool has fewer than ``k`` images besides the target.
    """
    cand = [i for i, s in enumerate(pool) if s != stem]
    if len(cand) < k:
        raise ValueError(f"support pool has {len(cand)} images besides {stem!r}, need k={k}")
    g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(stem.encode())) % 2**63)
    return [cand[int(i)] for i in torch.randperm(len(cand), generator=g)[:k]]


def low_res_mask(mask: np.ndarray, input_size: tuple[int, int]) -> torch.Tensor:
    """``(H, W)`` bool mask -> ``(256, 256)`` float in SAM's low-res frame (zero in the padding)."""
    out = torch.zeros(LOW_RES, LOW_RES)
    h4, w4 = low_res_valid_size(input_size)
    out[:h4, :w4] = gt_to_low_res(mask, input_size).float()
    return out


def hard_dice(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per-mask Dice of ``logits > 0`` vs ``target`` over the valid pixels.

    Args:
        logits: ``(B, 1, H, W)``.
        target: ``(B, 1, H, W)`` binary.
        valid: ``(B, 1, H, W)`` 0/1.

    Returns:
        ``(B,)`` Dice (1 when prediction and target are both empty).
    """
    p = (logits > 0).float() * valid
    t = (target > 0.5).float() * valid
    inter = (p * t).sum((1, 2, 3))
    denom = p.sum((1, 2, 3)) + t.sum((1, 2, 3))
    return torch.where(denom > 0, 2 * inter / denom.clamp_min(1e-9), torch.ones_like(denom))


def add_lora(module: nn.Module, rank: int, alpha: float, dropout: float = 0.0) -> nn.Module:
    """Inject LoRA adapters (peft) into the attention projections of ``module`` (in place).

    Args:
        module: e.g. SAM's ``mask_decoder``.
        rank: LoRA rank ``r``.
        alpha: LoRA scaling ``alpha``.
        dropout: LoRA dropout.

    Returns:
        ``module`` with only the adapters trainable.
    """
    from peft import LoraConfig, inject_adapter_in_model

    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(LORA_TARGETS))
    module = inject_adapter_in_model(cfg, module)
    for name, p in module.named_parameters():
        p.requires_grad_("lora_" in name)
    return module


def build_frozen_sam(variant: str, checkpoint: str | None) -> nn.Module:
    """SAM with its image encoder dropped (the task works on cached embeddings), all weights frozen."""
    from ppd.models.sam import build_sam

    sam = build_sam(variant, checkpoint)
    sam.image_encoder = nn.Identity()  # not needed on cached embeddings; saves memory
    return sam.requires_grad_(False).eval()


class ProxyPromptTask(L.LightningModule):
    """Proxy Prompt Generator + frozen SAM decoder, trained with the Dice loss.

    Args:
        feature_dim: linked by :class:`ppd.fit.PPDCLI` from the DataModule (unused here).
        sam_variant: SAM variant matching the cached embeddings (``vit_t``, ``vit_b``..., ``tiny``).
        sam_checkpoint: ``"default"`` (named weights), a path, or ``None`` (random; tests).
        generator: :class:`ppd.models.proxy_prompt.ProxyPromptConfig` fields (``dim``, ``grid``,
            ``num_tokens``, ``depth``, ``backbone``...).
        optimizer: ``sgd`` (paper: momentum 0.9) or ``adamw``.
        lr: learning rate (paper 0.01).
        momentum: SGD momentum.
        weight_decay: weight decay (paper 5e-4).
        bce_weight: weight of an extra BCE term (0 = Dice only, as in the paper).
        lora_rank: LoRA rank on SAM's mask decoder (0 = off, SAM fully frozen).
        lora_alpha: LoRA alpha.
        grad_clip: gradient-norm clip (``None`` = off).
        seed: seed of the generator's initialisation.
    """

    def __init__(
        self,
        feature_dim: int = 0,
        sam_variant: str = "vit_t",
        sam_checkpoint: str | None = "default",
        generator: dict[str, Any] | None = None,
        optimizer: str = "sgd",
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        bce_weight: float = 0.0,
        lora_rank: int = 0,
        lora_alpha: float = 16.0,
        grad_clip: float | None = 1.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {optimizer!r}")
        self.save_hyperparameters()
        self.strict_loading = False  # frozen SAM weights are not stored in checkpoints
        cfg = ProxyPromptConfig(**(generator or {}))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.generator = ProxyPromptGenerator(cfg)
        self.sam: nn.Module | None = None  # built in configure_model (instantiation reads no weights)

    def configure_model(self) -> None:
        """Build the frozen SAM (and its LoRA adapters) once; Lightning calls this before fit/validate."""
        if self.sam is not None:
            return
        h = self.hparams
        sam = build_frozen_sam(h.sam_variant, h.sam_checkpoint).to(self.device)
        if h.lora_rank > 0:
            add_lora(sam.mask_decoder, h.lora_rank, h.lora_alpha)
        self.sam = sam

    # -- model ----------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> ProxyPromptTask:
        super().train(mode)
        if self.sam is not None:
            self.sam.eval()  # frozen parts never switch to training behaviour
        return self

    def _support(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Support input ``(B, K, ...)`` for the contextual encoder and masks ``(B, K, 1, 256, 256)``."""
        key = "support_embedding" if self.generator.config.backbone == "sam" else "support_pixels"
        if key not in batch:
            raise KeyError(
                f"batch has no {key!r} (generator backbone {self.generator.config.backbone!r}); "
                "set data.support_size >= 1"
                + ("" if key == "support_embedding" else " and a data module that provides support pixels")
            )
        masks = batch["support_gt_low"]
        if masks.ndim == 4:
            masks = masks.unsqueeze(2)
        return batch[key], masks

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Low-res logits ``(B, 1, 256, 256)`` of every target in ``batch``."""
        self.configure_model()
        support, masks = self._support(batch)
        logits, _ = generate_and_decode(self.generator, self.sam, batch["embedding"], support, masks)
        return logits

    def loss(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Dice (+ optional BCE) loss on the valid low-res pixels."""
        from ppd.baselines.mask_losses import bce_loss, dice_loss

        loss = dice_loss(logits, batch["gt_low"], batch["valid"])
        if self.hparams.bce_weight:
            loss = loss + self.hparams.bce_weight * bce_loss(logits, batch["gt_low"], batch["valid"])
        return loss

    # -- steps ----------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self(batch)
        loss = self.loss(logits, batch)
        b = logits.shape[0]
        self.log("train/loss", loss, on_step=True, prog_bar=True, batch_size=b)
        self.log(
            "train/dice",
            hard_dice(logits, batch["gt_low"], batch["valid"]).mean(),
            on_step=True,
            batch_size=b,
        )
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits = self(batch)
        b = logits.shape[0]
        self.log("val/loss", self.loss(logits, batch), on_epoch=True, sync_dist=True, batch_size=b)
        dice = hard_dice(logits, batch["gt_low"], batch["valid"]).mean()
        self.log("val/dice", dice, on_epoch=True, prog_bar=True, sync_dist=True, batch_size=b)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        h = self.hparams
        if h.optimizer == "sgd":
            return torch.optim.SGD(params, lr=h.lr, momentum=h.momentum, weight_decay=h.weight_decay)
        return torch.optim.AdamW(params, lr=h.lr, weight_decay=h.weight_decay)

    def configure_gradient_clipping(
        self, optimizer: torch.optim.Optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
    ) -> None:  # type: ignore[no-untyped-def]
        if self.hparams.grad_clip:
            self.clip_gradients(
                optimizer, gradient_clip_val=self.hparams.grad_clip, gradient_clip_algorithm="norm"
            )

    # -- checkpoints ----------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        for k in [k for k in state if k.startswith("sam.") and "lora_" not in k]:
            del state[k]
        h = self.hparams
        checkpoint["proxy_prompt"] = {
            "generator": self.generator.config_dict(),
            "sam_variant": h.sam_variant,
            "lora_rank": int(h.lora_rank),
            "lora_alpha": float(h.lora_alpha),
        }


def load_generator(path: str, sam: nn.Module | None = None) -> tuple[ProxyPromptGenerator, dict[str, Any]]:
    """Load a trained generator (and its LoRA weights into ``sam``'s decoder, if any) from a task checkpoint.

    Args:
        path: Lightning checkpoint written by :class:`ProxyPromptTask`.
        sam: SAM to receive the decoder's LoRA weights (modified in place; pass a copy); required when
            the checkpoint has LoRA weights.

    Returns:
        The generator (eval mode) and the checkpoint's ``proxy_prompt`` metadata.

    Raises:
        ValueError: the file is not a Proxy Prompt checkpoint (names the file).
    """
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    meta = ckpt.get("proxy_prompt") if isinstance(ckpt, dict) else None
    if meta is None:
        raise ValueError(f"{path}: not a ProxyPromptTask checkpoint (no 'proxy_prompt' entry)")
    gen = ProxyPromptGenerator(ProxyPromptConfig(**meta["generator"]))
    state = ckpt["state_dict"]
    gen.load_state_dict({k[len("generator.") :]: v for k, v in state.items() if k.startswith("generator.")})
    if meta.get("lora_rank", 0) > 0:
        if sam is None:
            raise ValueError(f"{path}: has LoRA weights for SAM's decoder; pass the SAM to load them into")
        add_lora(sam.mask_decoder, meta["lora_rank"], meta["lora_alpha"])
        lora = {k[len("sam.") :]: v for k, v in state.items() if k.startswith("sam.") and "lora_" in k}
        missing = set(lora) - set(sam.state_dict())
        if missing:
            raise ValueError(f"{path}: LoRA weights do not fit the SAM decoder: {sorted(missing)[:3]}")
        sam.load_state_dict(lora, strict=False)
    return gen.eval(), meta
