"""The evaluation runner: registered methods x data sets -> per-image Dice/IoU, tables, paired differences.

Metrics: per-image Dice (DSC) and IoU at the **original image resolution** (SAM's low-res logits upscaled),
computed with ``torchmetrics`` and averaged over images (mDSC, mIoU), with seeded percentile-bootstrap
intervals over images. A *state* method's prompts go through SAM on the cached embedding; a *mask* method
gives the mask itself. One-shot reference: per data set ``reference: {stem: X}`` or ``{seed: S}``
(default the first stem); it is excluded from the evaluated images of *every* method and recorded in the
outputs. Per-image results are cached (:mod:`ppd.eval.cache`); ``--limit N`` evaluates the first N images
and reuses the cache.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ppd.eval.cache import (
    ResultCache,
    dataset_block,
    file_digest,
    method_key_parts,
    status_code,
    status_from_code,
)
from ppd.eval.config import DEFAULT_ENV, EvalConfig, EvalDataset
from ppd.eval.registry import Method, MethodContext, Reference, get_method
from ppd.eval.report import METRIC_NOTE, log_wandb, write_outputs
from ppd.eval.stats import paired_difference, summarise
from ppd.inference import mask_dice_iou

log = logging.getLogger("ppd.evaluate")


def select_reference(stems: Sequence[str], spec: dict[str, Any] | None) -> tuple[str, dict[str, Any]]:
    """Deterministic one-shot reference choice.

    Args:
        stems: the data set's stems in data-set order.
        spec: ``{stem: X}`` (that image), ``{seed: S}`` (``numpy.random.default_rng(S).integers(len)``) or
            ``None`` (the first stem).

    Returns:
        ``(stem, record)`` with ``record`` = ``{"stem": X, "rule": "stem" | "seed" | "first", "seed": S?}``.
    """
    if not stems:
        raise ValueError("cannot pick a reference from an empty data set")
    if spec is None:
        return stems[0], {"stem": stems[0], "rule": "first"}
    if "stem" in spec:
        stem = str(spec["stem"])
        if stem not in stems:
            raise ValueError(
                f"reference stem {stem!r} is not in the data set (first stems: {list(stems[:5])})"
            )
        return stem, {"stem": stem, "rule": "stem"}
    if "seed" in spec:
        s = int(spec["seed"])
        stem = stems[int(np.random.default_rng(s).integers(len(stems)))]
        return stem, {"stem": stem, "rule": "seed", "seed": s}
    raise ValueError(f"reference must be {{stem: X}} or {{seed: S}}, got {spec!r}")


class Evaluator:
    """Runs the configured methods on the configured data sets.

    Args:
        cfg: the :class:`EvalConfig`.
        defender: pre-built :class:`ppd.inference.PromptDefender` (default: loaded from ``cfg.defender``).
        progress: show progress bars.
    """

    def __init__(self, cfg: EvalConfig, defender: Any = None, progress: bool = True) -> None:
        from ppd.data.features import FeatureCache
        from ppd.export import load_attacker
        from ppd.inference import PromptDefender, resolve_defender

        self.cfg = cfg
        self.progress = progress
        self.out = Path(cfg.output_dir)
        cache_kw = dict(cfg.cache)
        if defender is None and cfg.defender:
            defender = PromptDefender.from_checkpoint(
                cfg.defender,
                device=cache_kw.get("device", "cpu"),
                max_steps=cfg.max_steps,
                cache_root=cache_kw.get("root"),
                decoder_backend=cfg.decoder_backend,
                keep_last_positive=cfg.keep_last_positive,
            )
        self.defender = defender
        self.unavailable: dict[str, str] = {}
        if defender is not None:
            self.env_config = {**DEFAULT_ENV, **defender.env_config}
            self.cache = defender.cache
            self.sam = defender.sam
        else:
            self.env_config = {**DEFAULT_ENV, **cfg.env}
            enc = {k: self.env_config[k] for k in ("sam_variant", "dino_name", "dino_resolution")}
            cache_kw.setdefault("dino_pretrained", enc["dino_name"] != "tiny")
            cache_kw.setdefault("sam_checkpoint", None if enc["sam_variant"] == "tiny" else "default")
            self.cache = FeatureCache(**{**cache_kw, **enc})
            self.sam = self.cache.sam_encoder.sam
            self.unavailable["defender"] = "no defender configured (defender: null)"
        self.grid = int(self.env_config["grid"])
        self.attacker = None
        if cfg.attacker:
            try:
                self.attacker, att_env = load_attacker(cfg.attacker)
            except ValueError as err:
                att_env = {}
                self.unavailable["attacker"] = str(err)
            if att_env and int(att_env.get("grid", self.grid)) != self.grid:
                raise ValueError(f"attacker grid {att_env['grid']} != defender/eval grid {self.grid}")
        else:
            self.unavailable["attacker"] = "no attacker configured (attacker: null in the config)"
        self.methods: dict[str, Method] = {m: get_method(m) for m in cfg.methods}
        checkpoints = {}
        for row, path in (cfg.checkpoints or {}).items():
            checkpoints[row] = file_digest(path) if Path(path).is_file() else None
        self.facts: dict[str, Any] = {
            "defender": None
            if defender is None
            else {
                "sha256_16": file_digest(resolve_defender(cfg.defender))
                if cfg.defender
                else getattr(defender, "digest", None),
                "max_steps": defender.max_steps,
                "keep_last_positive": defender.keep_last_positive,
                "sam_inputs": bool(getattr(defender, "sam_inputs", False)),
                "min_q": float(getattr(defender, "min_q", 0.0)),
            },
            "attacker": file_digest(cfg.attacker),
            "checkpoints": checkpoints,
        }

    def skip_reason(self, method: Method) -> str | None:
        """Why ``method`` cannot run here (an unmet need, or a used method that cannot), else None."""
        for need in method.needs:
            if need in self.unavailable:
                return self.unavailable[need]
            if need == "checkpoint":
                path = (self.cfg.checkpoints or {}).get(method.name)
                if not path:
                    return f"no checkpoint configured (checkpoints.{method.name})"
                if not Path(path).is_file():
                    return f"checkpoint {path} (checkpoints.{method.name}) does not exist"
        for used in method.uses:
            why = self.skip_reason(get_method(used))
            if why:
                return why
        return None

    def evaluate_dataset(self, ds: EvalDataset, limit: int | None) -> dict[str, Any]:
        """Run every configured method on one data set; returns its section of the results."""
        t0 = time.perf_counter()
        run = _DatasetRun(self, ds, limit)
        for name, m in self.methods.items():
            why = self.skip_reason(m)
            if why:
                log.warning("%s / %s skipped: %s", ds.name, name, why)
                run.skipped[name] = why
                continue
            run.ensure(name, run.eval_stems)
        section = run.section()
        section["seconds"] = time.perf_counter() - t0
        return section

    def run(self, limit: int | None = None) -> dict[str, Any]:
        """Evaluate everything, write ``results.{md,csv,json}`` (+ W&B table); returns the JSON dict."""
        limit = limit if limit is not None else self.cfg.limit
        t0 = time.perf_counter()
        sections = [self.evaluate_dataset(ds, limit) for ds in self.cfg.datasets]
        bs = self.cfg.bootstrap
        d = self.facts["defender"] or {}
        results = {
            "name": self.cfg.name,
            "metric": METRIC_NOTE,
            "bootstrap": {
                "resamples": bs.get("resamples", 1000),
                "confidence": bs.get("confidence", 0.95),
                "seed": self.cfg.seed,
            },
            "defender": self.cfg.defender,
            "defender_sha256_16": d.get("sha256_16"),
            "defender_max_steps": d.get("max_steps"),
            "attacker": self.cfg.attacker,
            "attack_steps": self.cfg.attack_steps,
            "checkpoints": dict(self.cfg.checkpoints or {}),
            "env": self.env_config,
            "limit": limit,
            "seed": self.cfg.seed,
            "datasets": sections,
            "seconds": time.perf_counter() - t0,
        }
        write_outputs(results, self.out)
        if self.cfg.wandb.get("enabled"):
            log_wandb(results, self.cfg)
        return results


class _DatasetRun:
    """One data set of a run: its images, reference, result cache and per-method records."""

    def __init__(self, ev: Evaluator, ds: EvalDataset, limit: int | None) -> None:
        from ppd.data.config import DatasetConfig

        self.ev, self.ds = ev, ds
        self.dataset = DatasetConfig(
            root=ds.root, kind=ds.kind, split=ds.split, options=dict(ds.options)
        ).build()
        stems = list(self.dataset.stems)
        self.ref_stem, self.ref_record = select_reference(stems, ds.reference)
        eval_idx = [i for i, s in enumerate(stems) if s != self.ref_stem]
        if limit is not None:
            eval_idx = eval_idx[:limit]
        self.stems = stems
        self.eval_idx = eval_idx
        self.eval_stems = [stems[i] for i in eval_idx]
        log.info(
            "%s: %d images evaluated, reference %s (%s)",
            ds.name,
            len(eval_idx),
            self.ref_stem,
            self.ref_record["rule"],
        )
        base = {"dataset": dataset_block(ds), "env": ev.env_config, "seed": ev.cfg.seed}
        self.cache = ResultCache(ev.out / "cache", base)
        self.records: dict[str, dict[str, dict[str, Any]]] = {}
        self.skipped: dict[str, str] = {}
        self._ctx: MethodContext | None = None

    # -- lazily built inputs (only when something has to be computed) ---------------------------------
    def context(self, method: Method) -> MethodContext:
        if self._ctx is None:
            from tqdm.auto import tqdm

            ev = self.ev
            samples = {}
            bar = tqdm(self.eval_idx, desc=f"{self.ds.name}: features", disable=not ev.progress, unit="img")
            for i in bar:
                s = self.dataset[i]
                samples[s.stem] = s
            feats = [ev.cache.get(samples[s].image) for s in self.eval_stems]
            masks = [samples[s].mask for s in self.eval_stems]
            if ev.defender is not None:
                env = ev.defender.make_env(feats, masks)
            else:
                from ppd.env.prompt_env import build_env

                env = build_env(ev.sam, feats, masks, ev.env_config, decoder_backend=ev.cfg.decoder_backend)
            ref = self.dataset[self.stems.index(self.ref_stem)]
            reference = Reference(
                self.ref_stem, ref.image, ref.mask, ev.cache.get(ref.image), self.ref_record
            )
            self._ctx = MethodContext(
                method=method,
                cfg=ev.cfg,
                dataset=self.ds,
                env=env,
                sid={s: j for j, s in enumerate(self.eval_stems)},
                images=samples,
                sam=ev.sam,
                cache=ev.cache,
                grid=ev.grid,
                reference=reference,
                defender=ev.defender,
                attacker=ev.attacker,
                state_fn=self.state,
            )
        return self._ctx.with_method(method)

    # -- records --------------------------------------------------------------------------------------
    def _parts(self, method: Method) -> dict[str, Any]:
        return method_key_parts(method, self.ev.cfg, self.ev.facts, self.ref_stem)

    def _path(self, method: Method) -> Path:
        return self.cache.path(method.name, self.ds.name, self._parts(method))

    def ensure(self, name: str, stems: list[str]) -> dict[str, dict[str, Any]]:
        """Records of ``name`` for ``stems`` (from memory, the result cache, or computed and cached)."""
        method = get_method(name)
        if name not in self.records:
            self.records[name] = self.cache.load(self._path(method))
        recs = self.records[name]
        missing = [s for s in stems if s not in recs]
        if missing:
            t0 = time.perf_counter()
            new = self.compute(method, missing)
            recs.update(new)
            header = {
                "method": name,
                "dataset": self.ds.name,
                "reference": self.ref_record,
                "config_hash": self.cache.key(self._parts(method)),
            }
            self.cache.store(self._path(method), header, new)
            log.info(
                "%s / %s: %d images in %.1f s", self.ds.name, name, len(missing), time.perf_counter() - t0
            )
        return {s: recs[s] for s in stems}

    def state(self, name: str, stems: list[str]) -> dict[str, torch.Tensor]:
        """``(N,)`` prompt states of a state method (the ``state_fn`` of the method context)."""
        method = get_method(name)
        if method.output != "state":
            raise ValueError(f"method {name!r} gives masks, not prompt states")
        recs = self.ensure(name, stems)
        return {s: status_from_code(recs[s]["status"]) for s in stems}

    def compute(self, method: Method, stems: list[str]) -> dict[str, dict[str, Any]]:
        """Run ``method`` on ``stems`` and score its outputs at original resolution."""
        ctx = self.context(method)
        outs = method.produce(ctx, list(stems))
        recs: dict[str, dict[str, Any]] = {}
        for s in stems:
            if s not in outs:
                raise ValueError(f"method {method.name!r} returned no output for image {s!r}")
            o = outs[s]
            i = ctx.sid[s]
            gt = ctx.gt_mask(s)
            rec: dict[str, Any] = {}
            if method.output == "state":
                st = torch.as_tensor(o.status).long() if o.status is not None else None
                if st is None or st.shape != (ctx.env.num_nodes,):
                    got = None if st is None else tuple(st.shape)
                    raise ValueError(
                        f"method {method.name!r}, image {s!r}: expected a (N,) = ({ctx.env.num_nodes},) state, got {got}"
                    )
                pred = ctx.env.full_resolution_mask(i, st).numpy()
                rec["status"] = status_code(st)
            else:
                pred = None if o.mask is None else np.asarray(o.mask, dtype=bool)
                if pred is None or pred.shape != gt.shape:
                    got = None if pred is None else pred.shape
                    raise ValueError(
                        f"method {method.name!r}, image {s!r}: expected an {gt.shape} mask, got {got}"
                    )
            d, j = mask_dice_iou(pred, gt)
            rec = {"dice": d, "iou": j, **rec, **o.extra}
            for used in method.uses:  # carry a source's failure flag along (e.g. FM gave no positive)
                src = self.records.get(used, {}).get(s, {})
                if "no_positive" in src and "no_positive" not in rec:
                    rec["no_positive"] = src["no_positive"]
            recs[s] = rec
        return recs

    # -- the section of the report -------------------------------------------------------------------
    def section(self) -> dict[str, Any]:
        cfg, stems = self.ev.cfg, self.eval_stems
        bs = cfg.bootstrap
        nb, conf = bs.get("resamples", 1000), bs.get("confidence", 0.95)
        out: dict[str, Any] = {
            "dataset": asdict(self.ds),
            "reference": self.ref_record,
            "n_images": len(stems),
            "methods": {},
            "paired": [],
        }
        no_pos: set[str] = set()
        for k, name in enumerate(self.ev.methods):
            if name in self.skipped:
                out["methods"][name] = {"skipped": self.skipped[name]}
                continue
            recs = self.records[name]
            d = np.array([recs[s]["dice"] for s in stems])
            j = np.array([recs[s]["iou"] for s in stems])
            seed = cfg.seed * 1000 + k
            mdsc, mdsc_ci = summarise(d, nb, conf, seed)
            miou, miou_ci = summarise(j, nb, conf, seed)
            entry: dict[str, Any] = {
                "skipped": None,
                "output": self.ev.methods[name].output,
                "n": len(d),
                "mdsc": mdsc,
                "miou": miou,
                "mdsc_ci": mdsc_ci,
                "miou_ci": miou_ci,
                "per_image": {s: {"dice": recs[s]["dice"], "iou": recs[s]["iou"]} for s in stems},
            }
            if any("no_positive" in recs[s] for s in stems):
                entry["no_positive_images"] = sorted(s for s in stems if recs[s].get("no_positive"))
                no_pos.update(entry["no_positive_images"])
            steps = [recs[s]["steps"] for s in stems if "steps" in recs[s]]
            if steps:
                entry["mean_defender_steps"] = float(np.mean(steps))
            out["methods"][name] = entry
        out["fm_no_positive"] = {"count": len(no_pos), "of": len(stems), "stems": sorted(no_pos)}
        for k, (a, b) in enumerate(cfg.paired):
            ea, eb = out["methods"].get(a), out["methods"].get(b)
            if ea is None or eb is None or ea["skipped"] or eb["skipped"]:
                continue
            da = [self.records[a][s]["dice"] for s in stems]
            db = [self.records[b][s]["dice"] for s in stems]
            mean, ci = paired_difference(da, db, nb, conf, cfg.seed + 7 + k)
            out["paired"].append({"a": a, "b": b, "mean_dsc_diff": mean, "ci": ci})
        return out
