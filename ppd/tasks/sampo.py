"""``SAMPOTask``: SAMPO preference-optimisation fine-tuning of SAM (arXiv 2508.02464) as a LightningModule.

One training step on a batch of B images (cached SAM embeddings, GT in SAM's low-res frame):

1. per image, N random prompt sets (1-3 positive, 0-3 negative GT clicks, some deliberately poor;
   :func:`ppd.baselines.preference.synthesize_prompt_sets`);
2. the current model pi_theta (SAM + LoRA) decodes all sets with multimask output (M = 3 masks per set);
   the reference pi_ref is the same network with the LoRA adapter disabled (``disable_adapter()``), i.e.
   the frozen initial model;
3. every mask y (binarised policy logits) is scored by IoU with the GT; winners/losers are mined across
   prompt sets per output slot (L_PO1) and across the M masks of each set (L_PO2);
4. ``log pi(y | S)`` is the per-pixel Bernoulli log-likelihood of the binary mask y under the logits
   (``loglik_reduction``: mean or sum over the valid low-res pixels), and
   ``L = lambda_dw * (L_PO1 + lambda_po2 * L_PO2) + L_SUP`` with DPO losses and
   ``L_SUP = BCE(winner logits, GT) + BCE(loser logits, GT)`` over all mined pairs.

``use_po: false`` keeps only L_SUP (plain supervised fine-tuning on the same masks: the
``sam_finetuned_sup`` baseline); ``use_po1`` / ``use_po2`` switch the two terms off for the ablations.
Validation: mDSC on the validation images with seeded 3 positive + 3 negative GT clicks
(:func:`ppd.baselines.sparse.predict_sparse`), for the tuned and (``val_reference``) the un-tuned model.

Checkpoints hold only the LoRA weights (the base SAM is rebuilt from its named weights); at the end of
training the adapter is exported to ``export_path`` (see :mod:`ppd.models.lora`, ``python -m
ppd.export_lora``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torchmetrics import MeanMetric
from torchmetrics.functional.classification import binary_f1_score

from ppd.baselines.mask_losses import bce_loss, dpo_loss, mask_log_likelihood
from ppd.baselines.preference import mask_iou, mine_inter_prompt, mine_intra_prompt, synthesize_prompt_sets
from ppd.baselines.sparse import predict_sparse
from ppd.data.points import stem_generator
from ppd.models.lora import adapter_payload, add_lora, save_adapter
from ppd.models.sam import build_sam, decode, low_res_valid_size

log = logging.getLogger(__name__)

#: SAM's low-res logit pixel -> input-frame coordinate (centre of the 4x4 block)
_LOW_TO_INPUT = 4.0


class SAMPOTask(L.LightningModule):
    """SAMPO fine-tuning of SAM's mask decoder (or image encoder) with LoRA.

    Args:
        sam_variant: ``vit_t`` (MobileSAM, default), ``vit_b``/``vit_l``/``vit_h`` or ``tiny`` (tests).
        sam_checkpoint: ``"default"`` (named weights), a path, or ``None`` (random).
        lora_rank: LoRA rank (paper: 64).
        lora_alpha: LoRA alpha (``None`` = rank, i.e. scaling 1).
        lora_dropout: LoRA dropout.
        lora_parts: SAM parts with LoRA on their linear layers: ``[mask_decoder]`` (default, works on cached
            embeddings) or e.g. ``[image_encoder, mask_decoder]`` (needs the DataModule's
            ``cache_embeddings: false``; GPU).
        n_prompt_sets: N prompt sets per image per step.
        max_pos: at most this many positive clicks per set (paper: 3).
        max_neg: at most this many negative clicks per set (paper: 3).
        p_poor: probability that a prompt set is deliberately poor (one wrongly labelled click).
        beta: DPO inverse temperature.
        loglik_reduction: ``mean`` or ``sum`` of the per-pixel log-likelihood (see
            :func:`ppd.baselines.mask_losses.mask_log_likelihood`).
        lambda_po2: weight of L_PO2 in L_PO (paper: 1).
        lambda_dw: weight of L_PO in the hybrid loss (paper: 1).
        use_po: use the preference terms at all (``False`` = L_SUP only).
        use_po1: use the inter-prompt term L_PO1.
        use_po2: use the intra-prompt term L_PO2.
        use_sup: use L_SUP.
        lr: AdamW learning rate (paper: 3e-4).
        weight_decay: AdamW weight decay (paper: 0.01).
        val_points: ``[n_pos, n_neg]`` seeded clicks per validation image (3 + 3).
        val_multimask: validation keeps the multimask output with the best predicted IoU (else the
            single-mask output).
        val_reference: also report the un-tuned model's validation mDSC (``val/mdsc_ref``).
        export_path: write the LoRA adapter here when training ends (``None`` = don't).
        seed: seed of the prompt-set synthesis and of the validation clicks.
        feature_dim: ignored (linked by :class:`ppd.fit.PPDCLI` from every DataModule).
    """

    def __init__(
        self,
        sam_variant: str = "vit_t",
        sam_checkpoint: str | None = "default",
        lora_rank: int = 16,
        lora_alpha: float | None = None,
        lora_dropout: float = 0.0,
        lora_parts: list[str] | None = None,
        n_prompt_sets: int = 8,
        max_pos: int = 3,
        max_neg: int = 3,
        p_poor: float = 0.25,
        beta: float = 1.0,
        loglik_reduction: str = "mean",
        lambda_po2: float = 1.0,
        lambda_dw: float = 1.0,
        use_po: bool = True,
        use_po1: bool = True,
        use_po2: bool = True,
        use_sup: bool = True,
        lr: float = 3e-4,
        weight_decay: float = 0.01,
        val_points: tuple[int, int] = (3, 3),
        val_multimask: bool = True,
        val_reference: bool = True,
        export_path: str | None = None,
        seed: int = 0,
        feature_dim: int | None = None,
    ) -> None:
        super().__init__()
        if loglik_reduction not in ("mean", "sum"):
            raise ValueError(f"loglik_reduction must be 'mean' or 'sum', got {loglik_reduction!r}")
        if n_prompt_sets < 2:
            raise ValueError(f"n_prompt_sets must be >= 2 (inter-prompt pairs), got {n_prompt_sets}")
        if not (use_po or use_sup):
            raise ValueError("use_po and use_sup are both false: nothing to train")
        self.save_hyperparameters()
        self.parts = list(lora_parts or ["mask_decoder"])
        self.encoder_lora = "image_encoder" in self.parts
        self.peft: torch.nn.Module | None = None  # built in configure_model (no weights read at init)
        self.strict_loading = False  # checkpoints hold the LoRA weights only
        self.val_mdsc = MeanMetric()
        self.val_mdsc_ref = MeanMetric()
        self.train_steps = 0
        self._t0 = time.perf_counter()

    # -- model access ---------------------------------------------------------------------------
    def configure_model(self) -> None:
        """Build SAM (reads its weights) and add the LoRA adapters; idempotent.

        Called by the Trainer and by ``load_from_checkpoint``, so instantiating the task from a config reads
        no weights.
        """
        if self.peft is not None:
            return
        hp = self.hparams
        sam = build_sam(hp.sam_variant, hp.sam_checkpoint)
        self.peft = add_lora(
            sam, rank=hp.lora_rank, alpha=hp.lora_alpha, dropout=hp.lora_dropout, parts=self.parts
        )

    @property
    def sam(self) -> torch.nn.Module:
        """The adapted SAM (LoRA active unless inside ``self.peft.disable_adapter()``); built on first use."""
        self.configure_model()
        return self.peft.base_model.model

    def lora_parameters(self) -> list[torch.nn.Parameter]:
        self.configure_model()
        return [p for p in self.parameters() if p.requires_grad]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(
            self.lora_parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay
        )

    def _embeddings(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``(B, 256, 64, 64)`` float embeddings: cached, or from the (adapted) encoder."""
        if "embedding" in batch:
            return batch["embedding"].float()
        if not self.encoder_lora:
            raise ValueError("batch has no cached 'embedding' and the image encoder has no LoRA")
        imgs = []
        for img, (h, w) in zip(batch["image"], batch["input_size"].tolist(), strict=True):
            imgs.append(self.sam.preprocess(img[:, :h, :w].float()[None])[0])
        return self.sam.image_encoder(torch.stack(imgs))

    # -- training -------------------------------------------------------------------------------
    def _prompt_sets(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B*N, K, 2)`` points in SAM's input frame and ``(B*N, K)`` labels."""
        hp = self.hparams
        g = torch.Generator().manual_seed(hp.seed * 1_000_003 + self.train_steps * 7919 + self.global_rank)
        pts_all, lab_all = [], []
        for b in range(batch["gt_low"].shape[0]):
            h4, w4 = low_res_valid_size(tuple(batch["input_size"][b].tolist()))
            gt = batch["gt_low"][b, 0, :h4, :w4].bool().cpu()
            pts, lab = synthesize_prompt_sets(gt, hp.n_prompt_sets, hp.max_pos, hp.max_neg, hp.p_poor, g)
            pts_all.append((pts + 0.5) * _LOW_TO_INPUT)
            lab_all.append(lab)
        k = max(p.shape[1] for p in pts_all)
        pts = torch.stack([torch.nn.functional.pad(p, (0, 0, 0, k - p.shape[1])) for p in pts_all])
        lab = torch.stack([torch.nn.functional.pad(x, (0, k - x.shape[1]), value=-1) for x in lab_all])
        return pts.flatten(0, 1), lab.flatten(0, 1)

    def sampo_losses(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """All loss terms and diagnostics of one batch (see the module docstring)."""
        self.configure_model()
        hp = self.hparams
        n = hp.n_prompt_sets
        gt = batch["gt_low"].to(self.device)  # (B, 1, 256, 256)
        valid = batch["valid"].to(self.device)
        b = gt.shape[0]
        pts, lab = self._prompt_sets(batch)
        emb = self._embeddings(batch).repeat_interleave(n, dim=0)
        logits, _ = decode(self.sam, emb, pts, lab, multimask_output=True, grad=True)  # (B*N, M, 256, 256)
        m = logits.shape[1]
        logits = logits.view(b, n, m, *logits.shape[-2:])
        y = logits.detach() > 0  # the policy's binary masks
        gt_e, valid_e = gt[:, None], valid[:, None]  # (B, 1, 1, 256, 256)
        iou = mask_iou(y, gt_e.bool(), valid_e)  # (B, N, M)
        out: dict[str, torch.Tensor] = {"iou_mean": iou.mean(), "iou_best": iou.flatten(1).amax(1).mean()}

        # pairs: PO1 per (image, slot) across prompt sets; PO2 per (image, set) across slots
        w1, l1, v1 = mine_inter_prompt(iou)  # (B, M)
        w2, l2, v2 = mine_intra_prompt(iou)  # (B, N)
        bi = torch.arange(b, device=iou.device)
        slots = torch.arange(m, device=iou.device)
        sets = torch.arange(n, device=iou.device)
        lw1 = logits[bi[:, None], w1, slots[None]]  # (B, M, 256, 256)
        ll1 = logits[bi[:, None], l1, slots[None]]
        lw2 = logits[bi[:, None], sets[None], w2]  # (B, N, 256, 256)
        ll2 = logits[bi[:, None], sets[None], l2]

        total = logits.new_zeros(())
        if hp.use_sup:
            lw = torch.cat([lw1, lw2], dim=1)
            lls = torch.cat([ll1, ll2], dim=1)
            t = gt.expand_as(lw)
            v = valid.expand_as(lw)
            out["l_sup"] = bce_loss(lw, t, v) + bce_loss(lls, t, v)
            total = total + out["l_sup"]
        if hp.use_po and (hp.use_po1 or hp.use_po2):
            with torch.no_grad(), self.peft.disable_adapter():
                ref = self._embeddings(batch) if self.encoder_lora else None
                ref_emb = emb if ref is None else ref.repeat_interleave(n, dim=0)
                ref_logits, _ = decode(self.sam, ref_emb, pts, lab, multimask_output=True, grad=False)
            ref_logits = ref_logits.view_as(logits)
            red = hp.loglik_reduction
            ll_pi = mask_log_likelihood(logits, y, valid_e, red)  # (B, N, M)
            ll_ref = mask_log_likelihood(ref_logits, y, valid_e, red)
            l_po = logits.new_zeros(())
            if hp.use_po1:
                pw, pl = ll_pi[bi[:, None], w1, slots[None]], ll_pi[bi[:, None], l1, slots[None]]
                rw, rl = ll_ref[bi[:, None], w1, slots[None]], ll_ref[bi[:, None], l1, slots[None]]
                out["l_po1"] = dpo_loss(
                    pw.flatten(), rw.flatten(), pl.flatten(), rl.flatten(), hp.beta, v1.flatten()
                )
                out["reward_acc_po1"] = (((pw - rw) - (pl - rl)) > 0).float()[v1].mean() if v1.any() else l_po
                l_po = l_po + out["l_po1"]
            if hp.use_po2:
                pw, pl = ll_pi[bi[:, None], sets[None], w2], ll_pi[bi[:, None], sets[None], l2]
                rw, rl = ll_ref[bi[:, None], sets[None], w2], ll_ref[bi[:, None], sets[None], l2]
                out["l_po2"] = dpo_loss(
                    pw.flatten(), rw.flatten(), pl.flatten(), rl.flatten(), hp.beta, v2.flatten()
                )
                l_po = l_po + hp.lambda_po2 * out["l_po2"]
            out["l_po"] = l_po
            total = total + hp.lambda_dw * l_po
        out["pairs_po1"] = v1.float().mean()
        out["pairs_po2"] = v2.float().mean()
        out["loss"] = total
        return out

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = self.sampo_losses(batch)
        self.train_steps += 1
        bs = batch["gt_low"].shape[0]
        self.log_dict({f"train/{k}": v.detach() for k, v in out.items()}, batch_size=bs, prog_bar=False)
        self.log("train/loss_step", out["loss"].detach(), prog_bar=True, batch_size=bs)
        self.log("train/steps_per_s", self.train_steps / (time.perf_counter() - self._t0), batch_size=bs)
        return out["loss"]

    # -- validation -----------------------------------------------------------------------------
    def _val_data(self) -> Any:
        return self.trainer.datamodule.split("val")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        hp = self.hparams
        data = self._val_data()
        emb = self._embeddings(batch).detach()
        models = [("", None)]
        if hp.val_reference:
            models.append(("_ref", self.peft.disable_adapter))
        for i, idx in enumerate(batch["index"].tolist()):
            info = data.info(idx)
            gt = torch.as_tensor(info.gt)
            for suffix, ctx in models:
                g = stem_generator(hp.seed, info.stem)
                if ctx is None:
                    pred = self._sparse(emb[i], info, g)
                else:
                    with ctx():
                        e = (
                            emb[i]
                            if not self.encoder_lora
                            else self._embeddings({k: v[i : i + 1] for k, v in batch.items()})[0]
                        )
                        pred = self._sparse(e, info, g)
                dsc = binary_f1_score(torch.as_tensor(pred).flatten().long(), gt.flatten().long())
                (self.val_mdsc if suffix == "" else self.val_mdsc_ref).update(dsc)

    def _sparse(self, emb: torch.Tensor, info: Any, g: torch.Generator) -> Any:
        n_pos, n_neg = self.hparams.val_points
        return predict_sparse(
            self.sam,
            emb,
            info.input_size,
            info.original_size,
            info.gt,
            g,
            n_pos,
            n_neg,
            multimask=self.hparams.val_multimask,
        ).mask

    def on_validation_epoch_end(self) -> None:
        self.log("val/mdsc", self.val_mdsc.compute(), prog_bar=True)
        self.val_mdsc.reset()
        if self.hparams.val_reference:
            self.log("val/mdsc_ref", self.val_mdsc_ref.compute())
            self.val_mdsc_ref.reset()

    # -- checkpoints / export -------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        checkpoint["sampo"] = {"train_steps": self.train_steps}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.train_steps = int(checkpoint.get("sampo", {}).get("train_steps", 0))

    def adapter(self) -> dict[str, Any]:
        """The LoRA adapter dict (see :func:`ppd.models.lora.adapter_payload`)."""
        self.configure_model()
        hp = self.hparams
        meta = {k: hp[k] for k in ("use_po", "use_po1", "use_po2", "use_sup", "n_prompt_sets", "beta")}
        meta.update(loglik_reduction=hp.loglik_reduction, train_steps=self.train_steps)
        return adapter_payload(self.peft, hp.sam_variant, meta)

    def export_adapter(self, path: str | Path) -> Path:
        """Write the LoRA adapter file atomically; returns the path."""
        return save_adapter(self.adapter(), path)

    def on_train_end(self) -> None:
        if self.hparams.export_path and self.global_rank == 0:
            path = self.export_adapter(self.hparams.export_path)
            log.info("LoRA adapter written to %s", path)
