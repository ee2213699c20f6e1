"""``python -m ppd.evaluate --config configs/eval/X.yaml [--limit N]``: methods x data sets -> mDSC / mIoU tables.

Metrics: per-image Dice (DSC) and IoU at the **original image resolution** (SAM's low-res logits upscaled),
computed with ``torchmetrics`` and averaged over images (mDSC, mIoU), with seeded percentile-bootstrap
intervals over images. Outputs (written atomically) under ``output_dir``: ``results.md``, ``results.csv``,
``results.json`` and, when ``wandb.enabled``, a W&B table.

Methods (all on the defender's ``G x G`` node grid unless noted):

* ``ideal`` -- ideal prompts (GT-labelled grid, capped counts; ``ideal:`` block).
* ``attack(ideal)`` -- the attacker's greedy roll-out from the ideal prompts (``attack_steps`` actions).
  Needs ``attacker:`` = a PPD *training* checkpoint (it holds ``q_att``); otherwise skipped with a reason.
* ``defense(attack(ideal))`` -- the defender refines the attacked prompts (stopping rule of
  :mod:`ppd.inference`).
* ``feature_matching`` / ``feature_matching+ppd`` -- one-shot prompts by DINOv2 patch matching against the
  reference image (``feature_matching:`` block), without / with the defender.
* ``one_click`` / ``one_click_multimask`` -- one positive click at the most interior GT pixel (maximum of
  the Euclidean distance transform, image border counted as background, first maximum in row-major order),
  not snapped to the grid; SAM's single-mask output vs the best of its 3 masks by predicted IoU.
* ``persam`` -- training-free PerSAM-style prompts (one positive, one negative node) from the reference.

One-shot reference: per data set ``reference: {stem: X}`` or ``{seed: S}`` (uniform pick among the stems in
data-set order); default the first stem. It is excluded from the evaluated images of *every* method, and
recorded in the outputs. Per-image results are cached as JSON per (method, data set, config hash) under
``output_dir/cache``; ``--limit N`` evaluates the first N images and reuses the cache.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from ppd.io import atomic_write_text

log = logging.getLogger("ppd.evaluate")

METHODS: tuple[str, ...] = (
    "ideal",
    "attack(ideal)",
    "defense(attack(ideal))",
    "feature_matching",
    "feature_matching+ppd",
    "one_click",
    "one_click_multimask",
    "persam",
)
NEEDS_DEFENDER = ("defense(attack(ideal))", "feature_matching+ppd")
NEEDS_ATTACKER = ("attack(ideal)", "defense(attack(ideal))")
#: which config parts each method's result depends on (besides data set, grid/encoders and seed)
METHOD_DEPS: dict[str, tuple[str, ...]] = {
    "ideal": ("ideal",),
    "attack(ideal)": ("ideal", "attacker", "attack_steps"),
    "defense(attack(ideal))": (
        "ideal",
        "attacker",
        "attack_steps",
        "defender",
        "max_steps",
        "keep_last_positive",
    ),
    "feature_matching": ("feature_matching", "reference"),
    "feature_matching+ppd": ("feature_matching", "reference", "defender", "max_steps", "keep_last_positive"),
    "one_click": (),
    "one_click_multimask": (),
    "persam": ("reference",),
}
CACHE_VERSION = "ppd-eval-v1"
METRIC_NOTE = (
    "per-image Dice (DSC) and IoU at the original image resolution (torchmetrics), averaged over images"
)


# ---------------------------------------------------------------------------------------------- config
@dataclass
class EvalDataset:
    """One evaluated data set.

    Attributes:
        name: short name used in tables.
        root: data set folder.
        kind: layout (``folder``, ``fss1000``, ``voc``).
        split: split file or list of stems (``None`` = all).
        reference: ``{stem: X}`` or ``{seed: S}`` (``None`` = first stem).
        options: extra dataset keyword arguments.
    """

    name: str
    root: str
    kind: str = "folder"
    split: str | list[str] | None = None
    reference: dict[str, Any] | None = None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalConfig:
    """Evaluation config (YAML, see ``configs/eval/*.yaml``).

    Attributes:
        output_dir: where results and the per-method cache go.
        datasets: evaluated data sets.
        methods: methods to run (subset of :data:`METHODS`, in table order).
        defender: exported defender or PPD training checkpoint (``None``: PPD methods skipped).
        attacker: PPD training checkpoint holding ``q_att`` (``None``: attack methods skipped).
        seed: seed of ideal-prompt subsampling, reference ``seed`` rules and the bootstrap.
        limit: evaluate at most this many images per data set (CLI ``--limit`` overrides).
        attack_steps: attacker actions for ``attack(ideal)``.
        max_steps: defender step budget (``None`` = defender default).
        decoder_backend: SAM mask-decoder backend, ``"torch"`` or ``"onnx"`` (CPU, ~2x faster decodes).
        keep_last_positive: the defender never removes the last positive prompt.
        bootstrap: ``{resamples: 1000, confidence: 0.95}``.
        ideal: keyword arguments of :func:`ppd.env.prompts.ideal_prompts` (``interval, max_pos, max_neg``).
        feature_matching: keyword arguments of :func:`ppd.env.prompts.feature_matching_prompts`.
        env: graph / encoder set-up used when there is no defender (``grid, k_feature, k_physical,
            sam_variant, dino_name, dino_resolution``); with a defender its own set-up is used.
        cache: feature-cache overrides (``root``, ``device``, ``sam_checkpoint``, ``dino_pretrained``).
        paired: pairs ``[a, b]`` whose per-image Dice difference ``a - b`` is bootstrapped.
        wandb: ``{enabled: false, project: ppd, mode: offline}``.
        name: title of the report.
    """

    output_dir: str
    datasets: list[EvalDataset]
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    defender: str | None = None
    attacker: str | None = None
    seed: int = 0
    limit: int | None = None
    attack_steps: int = 10
    max_steps: int | None = None
    decoder_backend: str = "torch"
    keep_last_positive: bool = True
    bootstrap: dict[str, Any] = field(default_factory=lambda: {"resamples": 1000, "confidence": 0.95})
    ideal: dict[str, Any] = field(default_factory=lambda: {"interval": 1, "max_pos": 10, "max_neg": 10})
    feature_matching: dict[str, Any] = field(
        default_factory=lambda: {"metric": "l2", "max_pos": 10, "max_neg": 10}
    )
    env: dict[str, Any] = field(default_factory=dict)
    cache: dict[str, Any] = field(default_factory=dict)
    paired: list[list[str]] = field(
        default_factory=lambda: [
            ["feature_matching+ppd", "feature_matching"],
            ["defense(attack(ideal))", "attack(ideal)"],
        ]
    )
    wandb: dict[str, Any] = field(
        default_factory=lambda: {"enabled": False, "project": "ppd", "mode": "offline"}
    )
    name: str = "evaluation"


DEFAULT_ENV = {
    "grid": 16,
    "k_feature": 8,
    "k_physical": 8,
    "sam_variant": "vit_t",
    "dino_name": "dinov2_vits14",
    "dino_resolution": 224,
}


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> EvalConfig:
    """Read an evaluation YAML (omegaconf interpolation, dotted overrides) into an :class:`EvalConfig`.

    Raises:
        ValueError: unknown keys or methods, missing data sets (the message names the file and field).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"evaluation config {path} does not exist")
    raw = OmegaConf.merge(OmegaConf.load(path), OmegaConf.from_dotlist(list(overrides)))
    data = OmegaConf.to_container(raw, resolve=True)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    known = set(EvalConfig.__dataclass_fields__)
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}; expected some of {sorted(known)}")
    for key in ("output_dir", "datasets"):
        if key not in data:
            raise ValueError(f"{path}: missing required key {key!r}")
    sets = []
    for i, d in enumerate(data["datasets"] or []):
        if not isinstance(d, dict) or "root" not in d:
            raise ValueError(f"{path}: datasets[{i}] needs at least 'root' (and usually 'name')")
        d = dict(d)
        d.setdefault("name", Path(d["root"]).name)
        bad = set(d) - set(EvalDataset.__dataclass_fields__)
        if bad:
            raise ValueError(f"{path}: datasets[{i}] has unknown keys {sorted(bad)}")
        ref = d.get("reference")
        if ref is not None and (not isinstance(ref, dict) or len(set(ref) & {"stem", "seed"}) != 1):
            raise ValueError(
                f"{path}: datasets[{i}].reference must be {{stem: X}} or {{seed: S}}, got {ref!r}"
            )
        sets.append(EvalDataset(**d))
    if not sets:
        raise ValueError(f"{path}: 'datasets' is empty")
    data["datasets"] = sets
    cfg = EvalConfig(**data)
    bad_methods = [m for m in cfg.methods if m not in METHODS]
    if bad_methods:
        raise ValueError(f"{path}: unknown methods {bad_methods}; expected some of {list(METHODS)}")
    return cfg


# ------------------------------------------------------------------------------------------- helpers


def file_digest(path: str | Path | None) -> str | None:
    """SHA-256 (first 16 hex) of a file, ``None`` for no file."""
    if path is None:
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def bootstrap_ci(
    values: Sequence[float] | np.ndarray, resamples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean.

    Hand-rolled (a few lines of numpy) because ``scipy`` is not a dependency; the resampling uses a
    seeded ``numpy.random.Generator``, so the interval is deterministic.

    Args:
        values: ``(n,)`` per-image values.
        resamples: number of bootstrap resamples.
        confidence: interval coverage, e.g. 0.95.
        seed: RNG seed.

    Returns:
        ``(low, high)``; ``(nan, nan)`` for no values.
    """
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if v.size == 0:
        return float("nan"), float("nan")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(int(resamples), v.size))].mean(axis=1)
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha])
    return float(lo), float(hi)


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


def _min_plus_last_dim(f: torch.Tensor) -> torch.Tensor:
    """``out[..., i] = min_j f[..., j] + (i - j)^2`` (exact 1-D squared distance transform), in chunks."""
    n = f.shape[-1]
    idx = torch.arange(n, dtype=f.dtype)
    sq = (idx[:, None] - idx[None, :]) ** 2  # (n_i, n_j)
    out = torch.empty_like(f)
    chunk = max(1, (1 << 24) // (n * n))
    for s in range(0, f.shape[0], chunk):
        out[s : s + chunk] = (f[s : s + chunk, None, :] + sq[None]).amin(-1)
    return out


def distance_transform(mask: np.ndarray) -> np.ndarray:
    """Exact Euclidean distance of each foreground pixel to the nearest background pixel.

    Pixels outside the image count as background. Separable exact EDT (a column pass then a row pass of
    the 1-D squared-distance transform, each an explicit min over all positions, done in torch chunks):
    hand-rolled because neither scipy nor OpenCV is a dependency. Cost ``O(H W (H + W))``, ~1 s for a
    768 x 576 image.

    Args:
        mask: ``(H, W)`` bool.

    Returns:
        ``(H, W)`` float32 distances (0 on background).
    """
    m = torch.from_numpy(np.pad(np.asarray(mask, dtype=bool), 1))
    dtype = torch.float32 if sum(m.shape) < 4000 else torch.float64  # exact integer squares
    big = float(sum(m.shape) ** 2)
    f = torch.where(m, torch.tensor(big, dtype=dtype), torch.tensor(0.0, dtype=dtype))
    f = _min_plus_last_dim(f.T.contiguous()).T  # along columns
    f = _min_plus_last_dim(f.contiguous())  # along rows
    return f.sqrt()[1:-1, 1:-1].float().numpy()


def most_interior_point(mask: np.ndarray) -> tuple[float, float] | None:
    """Pixel centre ``(x + 0.5, y + 0.5)`` of the maximum of :func:`distance_transform` (None if empty).

    Ties: the first maximum in row-major order.
    """
    if not np.asarray(mask).any():
        return None
    d = distance_transform(mask)
    y, x = np.unravel_index(int(np.argmax(d)), d.shape)
    return float(x) + 0.5, float(y) + 0.5


def status_code(status: torch.Tensor) -> str:
    """Compact string of a ``(N,)`` status (one digit per node) for the JSON cache."""
    return "".join(str(int(v)) for v in status.tolist())


def status_from_code(code: str) -> torch.Tensor:
    """Inverse of :func:`status_code`."""
    return torch.tensor([int(c) for c in code], dtype=torch.long)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")


def load_attacker(path: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The attacker Q-network of a PPD training checkpoint.

    Returns:
        ``(qnet in eval mode, env_config or {})``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file holds no attacker (e.g. an exported defender-only file).
    """
    from ppd.export import QNET_KEYS
    from ppd.models.qnet import QNetwork

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"attacker checkpoint {path} does not exist")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    state = {k[len("q_att.") :]: v for k, v in ckpt.get("state_dict", {}).items() if k.startswith("q_att.")}
    if not state:
        raise ValueError(f"{path} holds no attacker ('q_att.*' weights); give a PPD training checkpoint")
    hp = ckpt.get("hyper_parameters", {})
    qnet = QNetwork(in_dim=int(hp["feature_dim"]), out_per_node=2, **{k: hp[k] for k in QNET_KEYS if k in hp})
    qnet.load_state_dict(state)
    return qnet.eval(), dict(ckpt.get("ppd", {}).get("env_config") or {})


# ----------------------------------------------------------------------------------------- evaluator
@dataclass
class MethodResult:
    """Per-image results of one method on one data set (``records[stem]`` = dict with dice, iou, ...)."""

    method: str
    dataset: str
    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    skipped: str | None = None


class Evaluator:
    """Runs the configured methods on the configured data sets.

    Args:
        cfg: the :class:`EvalConfig`.
        defender: pre-built :class:`ppd.inference.PromptDefender` (default: loaded from ``cfg.defender``).
        progress: show progress bars.
    """

    def __init__(self, cfg: EvalConfig, defender: Any = None, progress: bool = True) -> None:
        from ppd.data.features import FeatureCache
        from ppd.inference import PromptDefender

        self.cfg = cfg
        self.progress = progress
        self.out = Path(cfg.output_dir)
        self.skip_reason: dict[str, str] = {}
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
        if defender is not None:
            self.env_config = {**DEFAULT_ENV, **defender.env_config}
            self.cache = defender.cache
            self.sam = defender.sam
        else:
            self.env_config = {**DEFAULT_ENV, **cfg.env}
            enc = {k: self.env_config[k] for k in ("sam_variant", "dino_name", "dino_resolution")}
            tiny = enc["dino_name"] == "tiny"
            cache_kw.setdefault("dino_pretrained", not tiny)
            cache_kw.setdefault("sam_checkpoint", None if enc["sam_variant"] == "tiny" else "default")
            self.cache = FeatureCache(**{**cache_kw, **enc})
            self.sam = self.cache.sam_encoder.sam
            for m in NEEDS_DEFENDER:
                self.skip_reason[m] = "no defender configured (defender: null)"
        self.grid = int(self.env_config["grid"])
        self.attacker = None
        if cfg.attacker:
            try:
                self.attacker, att_env = load_attacker(cfg.attacker)
            except ValueError as err:
                att_env = {}
                for m in NEEDS_ATTACKER:
                    self.skip_reason[m] = str(err)
            if att_env and int(att_env.get("grid", self.grid)) != self.grid:
                raise ValueError(f"attacker grid {att_env['grid']} != defender/eval grid {self.grid}")
        else:
            for m in NEEDS_ATTACKER:
                self.skip_reason.setdefault(m, "no attacker configured (attacker: null in the config)")
        self.digests = {"defender": file_digest(cfg.defender), "attacker": file_digest(cfg.attacker)}

    # -- hashing / cache --------------------------------------------------------------------------
    def config_hash(self, method: str, ds: EvalDataset, reference: dict[str, Any]) -> str:
        """Hash of everything ``method``'s per-image results on ``ds`` depend on."""
        parts: dict[str, Any] = {
            "version": CACHE_VERSION,
            "dataset": {k: v for k, v in asdict(ds).items() if k not in ("name", "reference")},
            "env": self.env_config,
            "seed": self.cfg.seed,
            "method": method,
        }
        src = {
            "ideal": self.cfg.ideal,
            "attacker": self.digests["attacker"],
            "attack_steps": self.cfg.attack_steps,
            "defender": self.digests["defender"],
            "max_steps": self.defender.max_steps if self.defender is not None else None,
            "keep_last_positive": getattr(self.defender, "keep_last_positive", True),
            "feature_matching": self.cfg.feature_matching,
            "reference": reference["stem"],
        }
        for dep in METHOD_DEPS[method]:
            parts[dep] = src[dep]
        blob = json.dumps(parts, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    def cache_path(self, method: str, ds: EvalDataset, reference: dict[str, Any]) -> Path:
        """``output_dir/cache/<method>__<dataset>__<hash>.json``."""
        h = self.config_hash(method, ds, reference)
        return self.out / "cache" / f"{_safe(method)}__{_safe(ds.name)}__{h}.json"

    # -- one data set -----------------------------------------------------------------------------
    def evaluate_dataset(self, ds: EvalDataset, limit: int | None) -> dict[str, Any]:
        """Run every configured method on one data set; returns its section of the results."""
        from tqdm.auto import tqdm

        from ppd.data.config import DatasetConfig

        t0 = time.perf_counter()
        dataset = DatasetConfig(root=ds.root, kind=ds.kind, split=ds.split, options=dict(ds.options)).build()
        stems = [
            dataset.stems[i] if hasattr(dataset, "stems") else dataset[i].stem for i in range(len(dataset))
        ]
        ref_stem, ref_record = select_reference(stems, ds.reference)
        eval_idx = [i for i, s in enumerate(stems) if s != ref_stem]
        if limit is not None:
            eval_idx = eval_idx[:limit]
        eval_stems = [stems[i] for i in eval_idx]
        log.info(
            "%s: %d images evaluated, reference %s (%s)", ds.name, len(eval_idx), ref_stem, ref_record["rule"]
        )

        methods = list(self.cfg.methods)
        results: dict[str, MethodResult] = {}
        todo: dict[str, list[str]] = {}
        for m in methods:
            res = MethodResult(m, ds.name)
            if m in self.skip_reason:
                res.skipped = self.skip_reason[m]
                log.warning("%s / %s skipped: %s", ds.name, m, res.skipped)
            else:
                p = self.cache_path(m, ds, ref_record)
                if p.is_file():
                    cached = json.loads(p.read_text())
                    res.records = {s: r for s, r in cached["records"].items() if s in eval_stems}
                todo[m] = [s for s in eval_stems if s not in res.records]
            results[m] = res
        need_images = any(todo.values())

        fm_info: dict[str, dict[str, Any]] = {}
        if need_images:
            samples = {}
            bar = tqdm(eval_idx, desc=f"{ds.name}: features", disable=not self.progress, unit="img")
            for i in bar:
                s = dataset[i]
                samples[s.stem] = (s, self.cache.get(s.image))
            ref_sample = dataset[stems.index(ref_stem)]
            ref_feats = self.cache.get(ref_sample.image)
            order = eval_stems
            feats = [samples[s][1] for s in order]
            masks = [samples[s][0].mask for s in order]
            env = self._make_env(feats, masks)
            sid = {s: j for j, s in enumerate(order)}
            state = _StateStore(self, env, ds, ref_sample, ref_feats, results, sid)
            for m in methods:
                if results[m].skipped or not todo[m]:
                    continue
                mt = time.perf_counter()
                state.compute(m, todo[m])
                rec = {s: results[m].records[s] for s in eval_stems if s in results[m].records}
                payload = {
                    "method": m,
                    "dataset": ds.name,
                    "reference": ref_record,
                    "config_hash": self.config_hash(m, ds, ref_record),
                    "records": _merge_cache(self.cache_path(m, ds, ref_record), rec),
                }
                atomic_write_text(self.cache_path(m, ds, ref_record), json.dumps(payload, indent=1))
                log.info("%s / %s: %d images in %.1f s", ds.name, m, len(todo[m]), time.perf_counter() - mt)
        for m in methods:
            if m in ("feature_matching", "feature_matching+ppd") and not results[m].skipped:
                fm_info.update({s: r for s, r in results[m].records.items() if "no_positive" in r})

        bs = self.cfg.bootstrap
        section: dict[str, Any] = {
            "dataset": asdict(ds),
            "reference": ref_record,
            "n_images": len(eval_stems),
            "methods": {},
            "paired": [],
        }
        for k, (m, res) in enumerate(results.items()):
            entry: dict[str, Any] = {"skipped": res.skipped}
            if not res.skipped:
                d = np.array([res.records[s]["dice"] for s in eval_stems])
                j = np.array([res.records[s]["iou"] for s in eval_stems])
                seed = self.cfg.seed * 1000 + k
                entry.update(
                    n=len(d),
                    mdsc=float(d.mean()) if len(d) else float("nan"),
                    miou=float(j.mean()) if len(j) else float("nan"),
                    mdsc_ci=bootstrap_ci(d, bs.get("resamples", 1000), bs.get("confidence", 0.95), seed),
                    miou_ci=bootstrap_ci(j, bs.get("resamples", 1000), bs.get("confidence", 0.95), seed),
                    per_image={
                        s: {"dice": res.records[s]["dice"], "iou": res.records[s]["iou"]} for s in eval_stems
                    },
                )
                if m.startswith("feature_matching"):
                    entry["no_positive_images"] = sorted(
                        s for s in eval_stems if res.records[s].get("no_positive")
                    )
                steps = [res.records[s]["steps"] for s in eval_stems if "steps" in res.records[s]]
                if steps:
                    entry["mean_defender_steps"] = float(np.mean(steps))
            section["methods"][m] = entry
        no_pos = [s for s, r in fm_info.items() if r.get("no_positive") and s in eval_stems]
        section["fm_no_positive"] = {"count": len(no_pos), "of": len(eval_stems), "stems": sorted(no_pos)}
        for k, (a, b) in enumerate(self.cfg.paired):
            ra, rb = results.get(a), results.get(b)
            if ra is None or rb is None or ra.skipped or rb.skipped:
                continue
            diff = np.array([ra.records[s]["dice"] - rb.records[s]["dice"] for s in eval_stems])
            lo, hi = bootstrap_ci(
                diff, bs.get("resamples", 1000), bs.get("confidence", 0.95), self.cfg.seed + 7 + k
            )
            section["paired"].append(
                {
                    "a": a,
                    "b": b,
                    "mean_dsc_diff": float(diff.mean()) if len(diff) else float("nan"),
                    "ci": (lo, hi),
                }
            )
        section["seconds"] = time.perf_counter() - t0
        return section

    def _make_env(self, feats: list[Any], masks: list[np.ndarray]) -> Any:
        if self.defender is not None:
            return self.defender.make_env(feats, masks)
        from ppd.env.prompt_env import PromptEnv

        c = self.env_config
        return PromptEnv(
            self.sam,
            feats,
            masks,
            grid=self.grid,
            k_feature=int(c["k_feature"]),
            k_physical=int(c["k_physical"]),
            decoder_backend=self.cfg.decoder_backend,
        )

    # -- all ----------------------------------------------------------------------------------------
    def run(self, limit: int | None = None) -> dict[str, Any]:
        """Evaluate everything, write ``results.{md,csv,json}`` (+ W&B table); returns the JSON dict."""
        limit = limit if limit is not None else self.cfg.limit
        t0 = time.perf_counter()
        sections = [self.evaluate_dataset(ds, limit) for ds in self.cfg.datasets]
        bs = self.cfg.bootstrap
        results = {
            "name": self.cfg.name,
            "metric": METRIC_NOTE,
            "bootstrap": {
                "resamples": bs.get("resamples", 1000),
                "confidence": bs.get("confidence", 0.95),
                "seed": self.cfg.seed,
            },
            "defender": self.cfg.defender,
            "defender_sha256_16": self.digests["defender"],
            "defender_max_steps": self.defender.max_steps if self.defender is not None else None,
            "attacker": self.cfg.attacker,
            "attack_steps": self.cfg.attack_steps,
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


def _merge_cache(path: Path, new: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Cached records of ``path`` (other stems, e.g. from a run without ``--limit``) plus ``new``."""
    old = json.loads(path.read_text())["records"] if path.is_file() else {}
    return {**old, **new}


class _StateStore:
    """Computes methods' prompt states per image, reusing prerequisites (ideal -> attack -> defence)."""

    def __init__(
        self,
        ev: Evaluator,
        env: Any,
        ds: EvalDataset,
        ref_sample: Any,
        ref_feats: Any,
        results: dict[str, MethodResult],
        sid: dict[str, int],
    ) -> None:
        from ppd.env.graph import pool_tokens

        self.ev, self.env, self.ds, self.results, self.sid = ev, env, ds, results, sid
        self.ref_mask = ref_sample.mask
        self.ref_tokens = pool_tokens(ref_feats.dino_tokens.float(), ev.grid)
        self.states: dict[str, dict[str, torch.Tensor]] = {}
        self.extra: dict[str, dict[str, dict[str, Any]]] = {}

    def _tokens(self, stem: str) -> torch.Tensor:
        from ppd.env.graph import pool_tokens

        return pool_tokens(self.env.features[self.sid[stem]].dino_tokens.float(), self.ev.grid)

    def status(self, method: str, stems: list[str]) -> dict[str, torch.Tensor]:
        """Prompt states of a grid method for ``stems`` (from memory, the result cache or computed)."""
        have = self.states.setdefault(method, {})
        cached = self.results[method].records if method in self.results else {}
        for s in stems:
            if s not in have and s in cached and "status" in cached[s]:
                have[s] = status_from_code(cached[s]["status"])
        missing = [s for s in stems if s not in have]
        if missing:
            have.update(self._compute_status(method, missing))
        return {s: have[s] for s in stems}

    def _compute_status(self, method: str, stems: list[str]) -> dict[str, torch.Tensor]:
        from ppd.env.prompts import feature_matching_prompts, ideal_prompts, persam_prompts
        from ppd.inference import greedy_defence
        from ppd.rl.rollout import rollout

        cfg, grid = self.ev.cfg, self.ev.grid
        out: dict[str, torch.Tensor] = {}
        extra = self.extra.setdefault(method, {})
        if method == "ideal":
            for s in stems:
                i = self.sid[s]
                g = torch.Generator().manual_seed(cfg.seed * 100_003 + _stable_int(s))
                out[s] = ideal_prompts(self.env.masks[i], grid, generator=g, **cfg.ideal)
        elif method == "attack(ideal)":
            start = self.status("ideal", stems)
            ids = torch.tensor([self.sid[s] for s in stems])
            res = rollout(
                self.env,
                self.ev.attacker,
                "attack",
                ids,
                torch.stack([start[s] for s in stems]),
                cfg.attack_steps,
            )
            out = {s: res.status[j] for j, s in enumerate(stems)}
        elif method in ("defense(attack(ideal))", "feature_matching+ppd"):
            src = "attack(ideal)" if method.startswith("defense") else "feature_matching"
            start = self.status(src, stems)
            ids = torch.tensor([self.sid[s] for s in stems])
            tr = greedy_defence(
                self.env,
                self.ev.defender.qnet,
                ids,
                torch.stack([start[s] for s in stems]),
                self.ev.defender.max_steps,
                self.ev.defender.keep_last_positive,
            )
            for j, s in enumerate(stems):
                out[s] = tr.status[j]
                extra[s] = {"steps": int(tr.steps[j]), "stop_reason": tr.stop_reason[j]}
        elif method == "feature_matching":
            for s in stems:
                st, info = feature_matching_prompts(
                    self.ref_tokens, self.ref_mask, self._tokens(s), **cfg.feature_matching
                )
                out[s] = st
                extra[s] = {
                    "no_positive": bool(info["no_positive"]),
                    "n_pos": info["n_pos"],
                    "n_neg": info["n_neg"],
                }
        elif method == "persam":
            for s in stems:
                out[s] = persam_prompts(self.ref_tokens, self.ref_mask, self._tokens(s))
        else:
            raise ValueError(f"{method} is not a grid method")
        return out

    def compute(self, method: str, stems: list[str]) -> None:
        """Fill ``results[method].records`` for ``stems``."""
        from ppd.inference import mask_dice_iou

        recs = self.results[method].records
        bar_stems = stems
        if method in ("one_click", "one_click_multimask"):
            for s in bar_stems:
                i = self.sid[s]
                pred, extra = self._one_click(i, multimask=method == "one_click_multimask")
                d, j = mask_dice_iou(pred, self.env.masks[i])
                recs[s] = {"dice": d, "iou": j, **extra}
            return
        states = self.status(method, stems)
        if method == "feature_matching+ppd":  # carry the FM failure flag along for reporting
            fm = self.extra.get("feature_matching", {})
            fm_rec = self.results["feature_matching"].records if "feature_matching" in self.results else {}
        for s in stems:
            i = self.sid[s]
            pred = self.env.full_resolution_mask(i, states[s]).numpy()
            d, j = mask_dice_iou(pred, self.env.masks[i])
            rec = {
                "dice": d,
                "iou": j,
                "status": status_code(states[s]),
                **self.extra.get(method, {}).get(s, {}),
            }
            if method == "feature_matching+ppd":
                src = fm.get(s) or fm_rec.get(s) or {}
                if "no_positive" in src:
                    rec["no_positive"] = src["no_positive"]
            recs[s] = rec

    def _one_click(self, i: int, multimask: bool) -> tuple[np.ndarray, dict[str, Any]]:
        from ppd.models.sam import decode, to_input_frame, upscale_logits

        f = self.env.features[i]
        gt = self.env.masks[i]
        pt = most_interior_point(gt)
        if pt is None:
            return np.zeros(f.original_size, dtype=bool), {"click": None}
        pts = to_input_frame(torch.tensor([[pt]], dtype=torch.float32), f.original_size)
        with torch.inference_mode():
            logits, iou = decode(
                self.ev.sam,
                f.sam_embedding.float()[None],
                pts,
                torch.ones(1, 1, dtype=torch.long),
                multimask_output=multimask,
            )
        k = int(iou[0].argmax()) if multimask else 0
        up = upscale_logits(logits[:, k : k + 1].float(), f.input_size, f.original_size)
        return (up[0, 0] > 0).numpy(), {"click": list(pt), "mask_index": k}


def _stable_int(s: str) -> int:
    """Process-independent small integer of a string (Python's ``hash`` is salted per process)."""
    return int(hashlib.sha256(s.encode()).hexdigest()[:8], 16)


# ------------------------------------------------------------------------------------------- outputs
def _fmt(v: float, ci: Sequence[float]) -> str:
    if v != v:  # NaN
        return "–"
    return f"{v:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def to_markdown(results: dict[str, Any]) -> str:
    """Markdown report of :meth:`Evaluator.run` results."""
    bs = results["bootstrap"]
    lines = [
        f"# {results['name']}",
        "",
        f"Metrics: {METRIC_NOTE} (mDSC, mIoU); [low, high] = {bs['confidence']:.0%} percentile bootstrap "
        f"interval over images ({bs['resamples']} resamples, seed {bs['seed']}).",
        "",
        f"- defender: `{results['defender']}` (sha256/16 `{results['defender_sha256_16']}`, step budget "
        f"{results['defender_max_steps']}); attacker: `{results['attacker']}` ({results['attack_steps']} steps)",
        f"- grid {results['env'].get('grid')}, SAM `{results['env'].get('sam_variant')}`, DINOv2 "
        f"`{results['env'].get('dino_name')}` at {results['env'].get('dino_resolution')} px; limit {results['limit']}",
        "",
    ]
    for sec in results["datasets"]:
        ref = sec["reference"]
        rule = f"seed {ref['seed']}" if ref["rule"] == "seed" else ref["rule"]
        lines += [
            f"## {sec['dataset']['name']} (n = {sec['n_images']}; one-shot reference `{ref['stem']}` ({rule}), excluded)",
            "",
            "| method | n | mDSC [95% CI] | mIoU [95% CI] | notes |",
            "|---|---|---|---|---|",
        ]
        for m, e in sec["methods"].items():
            if e["skipped"]:
                lines.append(f"| {m} | – | – | – | skipped: {e['skipped']} |")
                continue
            notes = []
            if "mean_defender_steps" in e:
                notes.append(f"mean defender steps {e['mean_defender_steps']:.1f}")
            if "no_positive_images" in e:
                notes.append(f"no positive prompt: {len(e['no_positive_images'])}/{e['n']}")
            lines.append(
                f"| {m} | {e['n']} | {_fmt(e['mdsc'], e['mdsc_ci'])} | {_fmt(e['miou'], e['miou_ci'])} | {'; '.join(notes)} |"
            )
        fm = sec["fm_no_positive"]
        lines += [
            "",
            f"Feature matching gave no positive prompt on {fm['count']} of {fm['of']} images"
            + (f" ({', '.join(fm['stems'])})." if fm["stems"] else "."),
        ]
        for p in sec["paired"]:
            lines.append(
                f"Paired mDSC difference `{p['a']}` − `{p['b']}`: {p['mean_dsc_diff']:+.3f} "
                f"[{p['ci'][0]:+.3f}, {p['ci'][1]:+.3f}]"
            )
        lines.append("")
    return "\n".join(lines)


CSV_FIELDS = (
    "dataset",
    "method",
    "n",
    "mdsc",
    "mdsc_lo",
    "mdsc_hi",
    "miou",
    "miou_lo",
    "miou_hi",
    "reference",
    "skipped",
)


def to_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One flat row per (data set, method), plus ``paired:a-b`` rows (Dice difference in the mDSC columns)."""
    rows = []
    for sec in results["datasets"]:
        name, ref = sec["dataset"]["name"], sec["reference"]["stem"]
        for m, e in sec["methods"].items():
            row = {"dataset": name, "method": m, "reference": ref, "skipped": e["skipped"] or ""}
            if not e["skipped"]:
                row.update(
                    n=e["n"],
                    mdsc=e["mdsc"],
                    mdsc_lo=e["mdsc_ci"][0],
                    mdsc_hi=e["mdsc_ci"][1],
                    miou=e["miou"],
                    miou_lo=e["miou_ci"][0],
                    miou_hi=e["miou_ci"][1],
                )
            rows.append(row)
        for p in sec["paired"]:
            rows.append(
                {
                    "dataset": name,
                    "method": f"paired:{p['a']} - {p['b']}",
                    "n": sec["n_images"],
                    "reference": ref,
                    "mdsc": p["mean_dsc_diff"],
                    "mdsc_lo": p["ci"][0],
                    "mdsc_hi": p["ci"][1],
                    "skipped": "",
                }
            )
    return rows


def write_outputs(results: dict[str, Any], out: Path) -> None:
    """Write ``results.md``, ``results.csv`` and ``results.json`` atomically into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.md", to_markdown(results))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore")
    w.writeheader()
    w.writerows(to_rows(results))
    atomic_write_text(out / "results.csv", buf.getvalue())
    atomic_write_text(out / "results.json", json.dumps(results, indent=1, default=str))


def log_wandb(results: dict[str, Any], cfg: EvalConfig) -> None:
    """Log the results table to W&B (offline by default)."""
    import wandb

    w = cfg.wandb
    run = wandb.init(
        project=w.get("project", "ppd"),
        mode=w.get("mode", "offline"),
        name=cfg.name,
        dir=str(cfg.output_dir),
        job_type="eval",
        config={
            "defender": cfg.defender,
            "attacker": cfg.attacker,
            "limit": results["limit"],
            "seed": cfg.seed,
        },
    )
    rows = to_rows(results)
    table = wandb.Table(columns=list(CSV_FIELDS), data=[[r.get(c, None) for c in CSV_FIELDS] for r in rows])
    run.log({"eval/results": table})
    run.finish()


def main(
    argv: list[str] | None = None, evaluator_factory: Callable[[EvalConfig], Evaluator] | None = None
) -> int:
    """Entry point; returns the exit code."""
    p = argparse.ArgumentParser(prog="python -m ppd.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="evaluation YAML (configs/eval/*.yaml)")
    p.add_argument("--limit", type=int, default=None, help="evaluate at most N images per data set")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. output_dir=/tmp/x seed=1")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("WANDB_MODE", "offline")
    cfg = load_config(a.config, a.overrides)
    ev = evaluator_factory(cfg) if evaluator_factory else Evaluator(cfg, progress=not a.quiet)
    results = ev.run(limit=a.limit)
    print(to_markdown(results))
    print(f"wrote {Path(cfg.output_dir) / 'results.md'} (+ .csv, .json) in {results['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
