"""Evaluation config (YAML under ``configs/eval/``): data sets, methods, defender/attacker, options."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from ppd.env.fm_variants import default_fm_options
from ppd.eval.registry import get_method

#: default table (methods in row order)
DEFAULT_METHODS: tuple[str, ...] = (
    "ideal",
    "attack(ideal)",
    "defense(attack(ideal))",
    "feature_matching",
    "feature_matching+ppd",
    "one_click",
    "one_click_multimask",
    "persam",
)
#: graph / encoder set-up used when no defender is configured
DEFAULT_ENV: dict[str, Any] = {
    "grid": 16,
    "k_feature": 8,
    "k_physical": 8,
    "sam_variant": "vit_t",
    "dino_name": "dinov2_vits14",
    "dino_resolution": 224,
}


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
        methods: table rows, in order (registered names, see ``python -m ppd.evaluate --list``).
        defender: exported defender or PPD training checkpoint (``None``: defender rows skipped).
        attacker: PPD training checkpoint holding ``q_att`` (``None``: attacker rows skipped).
        checkpoints: trained baselines' files by row name (``{sampo: PATH}``; a row needing one is
            skipped without it).
        method_options: per-row options (``{row: {...}}``), read by the method via ``ctx.options()``.
        seed: seed of ideal-prompt subsampling, per-image generators, reference ``seed`` rules and the
            bootstrap.
        limit: evaluate at most this many images per data set (CLI ``--limit`` overrides).
        attack_steps: attacker actions for ``attack(X)``.
        max_steps: defender step budget (``None`` = the defender file's own setting).
        decoder_backend: SAM mask-decoder backend, ``"torch"`` or ``"onnx"`` (CPU, ~2x faster decodes).
        keep_last_positive: the defender never removes the last positive prompt.
        bootstrap: ``{resamples: 1000, confidence: 0.95}``.
        ideal: keyword arguments of :func:`ppd.env.prompts.ideal_prompts` (``interval, max_pos, max_neg``).
        feature_matching: keyword arguments of :func:`ppd.env.prompts.feature_matching_prompts`; default:
            the dev-chosen variant's recipe (:func:`ppd.env.fm_variants.default_fm_options`, ``mutual``).
        env: graph / encoder set-up used when there is no defender (``grid, k_feature, k_physical,
            sam_variant, dino_name, dino_resolution``); with a defender its own set-up is used.
        cache: feature-cache overrides (``root``, ``device``, ``sam_checkpoint``, ``dino_pretrained``).
        paired: pairs ``[a, b]`` whose per-image Dice difference ``a - b`` is bootstrapped.
        wandb: ``{enabled: false, project: ppd, mode: offline}``.
        name: title of the report.
    """

    output_dir: str
    datasets: list[EvalDataset]
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    defender: str | None = None
    attacker: str | None = None
    checkpoints: dict[str, str] = field(default_factory=dict)
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    seed: int = 0
    limit: int | None = None
    attack_steps: int = 10
    max_steps: int | None = None
    decoder_backend: str = "torch"
    keep_last_positive: bool = True
    bootstrap: dict[str, Any] = field(default_factory=lambda: {"resamples": 1000, "confidence": 0.95})
    ideal: dict[str, Any] = field(default_factory=lambda: {"interval": 1, "max_pos": 10, "max_neg": 10})
    feature_matching: dict[str, Any] = field(default_factory=default_fm_options)
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


def _dataset(path: Path, i: int, d: Any) -> EvalDataset:
    if not isinstance(d, dict) or "root" not in d:
        raise ValueError(f"{path}: datasets[{i}] needs at least 'root' (and usually 'name')")
    d = dict(d)
    d.setdefault("name", Path(d["root"]).name)
    bad = set(d) - set(EvalDataset.__dataclass_fields__)
    if bad:
        raise ValueError(f"{path}: datasets[{i}] has unknown keys {sorted(bad)}")
    ref = d.get("reference")
    if ref is not None and (not isinstance(ref, dict) or len(set(ref) & {"stem", "seed"}) != 1):
        raise ValueError(f"{path}: datasets[{i}].reference must be {{stem: X}} or {{seed: S}}, got {ref!r}")
    return EvalDataset(**d)


def validate(cfg: EvalConfig, source: str = "eval config") -> EvalConfig:
    """Check method names, paired rows and per-row blocks against the registry.

    Raises:
        ValueError: the message names ``source`` and the field.
    """
    bad = []
    for m in cfg.methods:
        try:
            get_method(m)
        except ValueError:
            bad.append(m)
    if bad:
        from ppd.eval.registry import list_methods

        raise ValueError(f"{source}: unknown methods {bad}; expected some of {list_methods()}")
    for pair in cfg.paired:
        if not (isinstance(pair, list | tuple) and len(pair) == 2):
            raise ValueError(f"{source}: paired entries must be [a, b], got {pair!r}")
    if cfg.max_steps is not None and cfg.max_steps < 0:
        raise ValueError(f"{source}: max_steps must be null or >= 0, got {cfg.max_steps}")
    return cfg


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> EvalConfig:
    """Read an evaluation YAML (omegaconf interpolation, dotted overrides) into an :class:`EvalConfig`.

    Raises:
        FileNotFoundError: no such file.
        ValueError: unknown keys or methods, missing data sets (the message names the file and field).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"evaluation config {path} does not exist")
    try:
        raw = OmegaConf.merge(OmegaConf.load(path), OmegaConf.from_dotlist(list(overrides)))
        data = OmegaConf.to_container(raw, resolve=True)
    except Exception as err:  # omegaconf/yaml raise many types; the user needs the file and the reason
        raise ValueError(f"{path}: cannot read the config ({type(err).__name__}: {err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    known = set(EvalConfig.__dataclass_fields__)
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}; expected some of {sorted(known)}")
    for key in ("output_dir", "datasets"):
        if key not in data:
            raise ValueError(f"{path}: missing required key {key!r}")
    sets = [_dataset(path, i, d) for i, d in enumerate(data["datasets"] or [])]
    if not sets:
        raise ValueError(f"{path}: 'datasets' is empty")
    data["datasets"] = sets
    return validate(EvalConfig(**data), str(path))
