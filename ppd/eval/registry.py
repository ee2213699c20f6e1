"""The evaluation method registry and the small types every method shares (bottom of ``ppd.eval``).

A method is one declaration::

    @register_method("my_method", output="state", needs=("reference",), config=("feature_matching",))
    def my_method(ctx: MethodContext, stems: list[str]) -> dict[str, MethodOutput]:
        ...

and everything else derives from it (the design follows ``segment_anything``'s ``sam_model_registry`` and
timm's ``register_model``): the names an eval config may list, the table rows, the skip reason when a need
is not met, and the result-cache key (the config fields in ``config``, the method's ``method_options``,
the digests of the files in ``needs`` and, recursively, the keys of the methods in ``uses``).

Methods with a source, like ``attack(ideal)`` or ``oracle_removal(feature_matching)``, come from a
*template* (:func:`register_template`): ``get_method("oracle_removal(feature_matching)")`` binds the
template to its source, which becomes the method's ``uses``. Sources nest: ``defense(attack(ideal))``.

This module imports nothing from the runner: the runner builds a :class:`MethodContext` and hands it to
the methods, which never import the runner back.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

#: what a method may need; a row whose need is not met is skipped with a reason
NEEDS: tuple[str, ...] = ("reference", "defender", "attacker", "checkpoint")
#: ``state``: a ``(N,)`` prompt state on the node grid (SAM predicts the mask); ``mask``: ``(H, W)`` bool
OUTPUTS: tuple[str, ...] = ("state", "mask")


@dataclass
class MethodOutput:
    """What a method produces for one image.

    Attributes:
        status: ``(N,)`` long prompt state (``output="state"``), else None.
        mask: ``(H, W)`` bool prediction at original resolution (``output="mask"``), else None.
        extra: JSON-serialisable per-image details kept in the result cache (e.g. ``steps``,
            ``stop_reason``, ``no_positive``, the clicks used).
    """

    status: torch.Tensor | None = None
    mask: np.ndarray | None = None
    extra: dict[str, Any] = field(default_factory=dict)


Produce = Callable[["MethodContext", list[str]], dict[str, MethodOutput]]


@dataclass(frozen=True)
class Method:
    """One registered evaluation method (a table row).

    Attributes:
        name: row name, e.g. ``feature_matching`` or ``defense(attack(ideal))``.
        produce: ``produce(ctx, stems) -> {stem: MethodOutput}``.
        output: ``"state"`` or ``"mask"``.
        needs: subset of :data:`NEEDS`.
        uses: methods whose states ``produce`` reads through ``ctx.state``.
        config: top-level eval-config fields its results depend on (besides ``method_options[name]``).
        description: one line for docs and ``--list``.
    """

    name: str
    produce: Produce
    output: str
    needs: tuple[str, ...] = ()
    uses: tuple[str, ...] = ()
    config: tuple[str, ...] = ()
    description: str = ""


@dataclass(frozen=True)
class _Template:
    prefix: str
    produce: Callable[[MethodContext, list[str], str], dict[str, MethodOutput]]
    output: str
    needs: tuple[str, ...]
    config: tuple[str, ...]
    description: str


_METHODS: dict[str, Method] = {}
_TEMPLATES: dict[str, _Template] = {}
_NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")
_TEMPLATED = re.compile(r"^([A-Za-z0-9_.+-]+)\((.+)\)$")


def _check_declaration(name: str, output: str, needs: Sequence[str]) -> None:
    if not _NAME.match(name):
        raise ValueError(f"method name {name!r}: use letters, digits and _ . + - only")
    if output not in OUTPUTS:
        raise ValueError(f"method {name!r}: output must be one of {OUTPUTS}, got {output!r}")
    bad = [n for n in needs if n not in NEEDS]
    if bad:
        raise ValueError(f"method {name!r}: unknown needs {bad}; expected some of {NEEDS}")
    if name in _METHODS or name in _TEMPLATES:
        raise ValueError(f"method {name!r} is already registered")


def register_method(
    name: str,
    *,
    output: str,
    needs: Sequence[str] = (),
    uses: Sequence[str] = (),
    config: Sequence[str] = (),
    description: str = "",
) -> Callable[[Produce], Produce]:
    """Decorator registering ``produce(ctx, stems)`` as the evaluation method ``name`` (see module doc)."""

    def deco(fn: Produce) -> Produce:
        _check_declaration(name, output, needs)
        doc = description or next(iter((fn.__doc__ or "").strip().splitlines()), "")
        _METHODS[name] = Method(name, fn, output, tuple(needs), tuple(uses), tuple(config), doc)
        return fn

    return deco


def register_template(
    prefix: str,
    *,
    output: str,
    needs: Sequence[str] = (),
    config: Sequence[str] = (),
    description: str = "",
) -> Callable[[Callable[..., dict[str, MethodOutput]]], Callable[..., dict[str, MethodOutput]]]:
    """Decorator registering ``produce(ctx, stems, source)`` as the method family ``prefix(SOURCE)``.

    ``SOURCE`` is any state method (itself possibly templated); it is the bound method's ``uses``.
    """

    def deco(fn: Callable[..., dict[str, MethodOutput]]) -> Callable[..., dict[str, MethodOutput]]:
        _check_declaration(prefix, output, needs)
        _TEMPLATES[prefix] = _Template(prefix, fn, output, tuple(needs), tuple(config), description)
        return fn

    return deco


def unregister_method(name: str) -> None:
    """Remove a method or template (tests register toy methods and clean up)."""
    _METHODS.pop(name, None)
    _TEMPLATES.pop(name, None)


def get_method(name: str) -> Method:
    """The method called ``name`` (a registered name or ``template(source)``).

    Raises:
        ValueError: unknown name, unknown template, or a source that is not a state method.
    """
    _load_builtin()
    if name in _METHODS:
        return _METHODS[name]
    m = _TEMPLATED.match(name)
    if m and m.group(1) in _TEMPLATES:
        t, source = _TEMPLATES[m.group(1)], m.group(2)
        src = get_method(source)
        if src.output != "state":
            raise ValueError(f"method {name!r}: its source {source!r} gives masks, not prompt states")

        def produce(ctx: MethodContext, stems: list[str], _t: _Template = t, _s: str = source) -> Any:
            return _t.produce(ctx, stems, _s)

        desc = t.description.replace("X", source) if t.description else ""
        return Method(name, produce, t.output, t.needs, (source,), t.config, desc)
    raise ValueError(f"unknown method {name!r}; expected one of {list_methods()}")


def list_methods() -> list[str]:
    """Registered method names, plus templates as ``prefix(X)``."""
    _load_builtin()
    return sorted(_METHODS) + sorted(f"{p}(X)" for p in _TEMPLATES)


def describe_methods() -> list[tuple[str, str]]:
    """``(name, description)`` of every method and template (``python -m ppd.evaluate --list``)."""
    _load_builtin()
    rows = [(m.name, m.description) for m in _METHODS.values()]
    rows += [(f"{t.prefix}(X)", t.description) for t in _TEMPLATES.values()]
    return sorted(rows)


def _load_builtin() -> None:
    import ppd.eval.methods  # noqa: F401  (registers the built-in methods on first use)


def stable_int(s: str) -> int:
    """Process-independent small integer of a string (Python's ``hash`` is salted per process)."""
    return int(hashlib.sha256(s.encode()).hexdigest()[:8], 16)


@dataclass
class Reference:
    """The one-shot reference of a data set (excluded from its evaluated images).

    Attributes:
        stem: its stem.
        image: ``(H, W, 3)`` uint8.
        mask: ``(H, W)`` bool.
        features: its cached features.
        record: how it was chosen (``{"stem", "rule", "seed"?}``).
    """

    stem: str
    image: np.ndarray
    mask: np.ndarray
    features: Any
    record: dict[str, Any]


@dataclass
class MethodContext:
    """Everything a method may use, built by the runner per (data set, method).

    Attributes:
        method: the :class:`Method` being computed.
        cfg: the eval config (``ppd.eval.config.EvalConfig``).
        dataset: the evaluated data set block.
        env: :class:`ppd.env.prompt_env.PromptEnv` over the evaluated images (image id = ``sid[stem]``).
        sid: stem -> image id of ``env``.
        images: stem -> ``Sample`` (image, mask, paths).
        sam: SAM model matching the cached embeddings.
        cache: the :class:`ppd.data.features.FeatureCache`.
        grid: node grid side ``G``.
        reference: the one-shot reference (None when no method needs it).
        defender: :class:`ppd.inference.PromptDefender` or None.
        attacker: the attacker agent (:class:`~ppd.rl.agent.DQNAgent`, :func:`ppd.export.load_attacker`) or None.
        state_fn: ``state_fn(method_name, stems) -> {stem: (N,) status}`` (memory, cache or computed).
    """

    method: Method
    cfg: Any
    dataset: Any
    env: Any
    sid: dict[str, int]
    images: dict[str, Any]
    sam: torch.nn.Module
    cache: Any
    grid: int
    reference: Reference | None
    defender: Any
    attacker: Any
    state_fn: Callable[[str, list[str]], dict[str, torch.Tensor]]

    def state(self, method: str, stems: list[str]) -> dict[str, torch.Tensor]:
        """``(N,)`` prompt states of another state method for ``stems``."""
        return self.state_fn(method, stems)

    def features(self, stem: str) -> Any:
        """Cached features (``CachedFeatures``) of an evaluated image."""
        return self.env.features[self.sid[stem]]

    def gt_mask(self, stem: str) -> np.ndarray:
        """``(H, W)`` bool ground truth of an evaluated image."""
        return np.asarray(self.env.masks[self.sid[stem]], dtype=bool)

    def image(self, stem: str) -> np.ndarray:
        """``(H, W, 3)`` uint8 evaluated image."""
        return self.images[stem].image

    def generator(self, stem: str, salt: int = 0) -> torch.Generator:
        """RNG seeded by ``(cfg.seed, stem, salt)``: the same for every method and every run."""
        return torch.Generator().manual_seed(self.cfg.seed * 100_003 + stable_int(stem) + salt)

    def options(self) -> dict[str, Any]:
        """This method's ``method_options`` block of the eval config (``{}`` when absent)."""
        return dict((self.cfg.method_options or {}).get(self.method.name, {}) or {})

    def checkpoint(self, key: str | None = None) -> Path:
        """The trained checkpoint ``checkpoints[key or method name]`` of the eval config."""
        key = key or self.method.name
        path = (self.cfg.checkpoints or {}).get(key)
        if not path:
            raise ValueError(f"eval config: checkpoints.{key} is not set")
        return Path(path)

    def with_method(self, method: Method) -> MethodContext:
        """The same context for another method."""
        return replace(self, method=method)
