"""Silence known-harmless third-party warnings at the project's entry points (each with its reason).

Only messages that were examined and found harmless are filtered, each by its exact text and module;
every other warning (including the project's own) still shows.
"""

from __future__ import annotations

import warnings

#: (message regex, category, module regex, why it is harmless)
KNOWN_HARMLESS: tuple[tuple[str, type[Warning], str, str], ...] = (
    (
        r"Overwriting tiny_vit_\w+ in registry",
        UserWarning,
        r"mobile_sam\..*",
        "mobilesam-mirror re-registers timm's TinyViT names for its own TinyViT; we build it by class, not by name",
    ),
    (
        r"Importing from timm\.models\.(layers|registry) is deprecated",
        FutureWarning,
        r"timm\..*|mobile_sam\..*",
        "mobilesam-mirror imports timm's old module paths; they still resolve in the pinned timm",
    ),
    (
        r"`torch\.jit\.script` is deprecated",
        FutureWarning,
        r"torch\..*|mobile_sam\..*|timm\..*",
        "a dependency scripts a helper at import time; the project never relies on TorchScript",
    ),
    (
        r"Converting a tensor to a Python float might cause the trace to be incorrect",
        Warning,
        r".*",
        "ONNX export of SAM's decoder: the float is the attention scale, a constant of the model",
    ),
    (
        r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        Warning,
        r"lightning\..*",
        "Lightning's pytree helper uses a torch API deprecated in newer torch; behaviour unchanged",
    ),
    (
        r"Your `IterableDataset` has `__len__` defined",
        Warning,
        r"lightning\..*",
        "ReplayBatches defines __len__ for the progress bar and runs with num_workers=0 (no duplication)",
    ),
    (
        r"Using ModelCheckpoint with manual optimization",
        Warning,
        r"lightning\..*",
        "PPDTask checkpoints after the optimiser step with matching counters: exactly what an exact resume needs",
    ),
)


def quiet_known_warnings() -> None:
    """Install the filters of :data:`KNOWN_HARMLESS` (idempotent)."""
    for message, category, module, _why in KNOWN_HARMLESS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
