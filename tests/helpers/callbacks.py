"""Test-only Lightning callbacks (importable from a config when the repository root is on ``PYTHONPATH``)."""

from __future__ import annotations

import time
from typing import Any

from lightning.pytorch.callbacks import Callback


class Throttle(Callback):
    """Sleep after every training step, so a signal sent from outside lands while training still runs.

    Only wall-clock changes: no state, no randomness (the resumed and the reference run stay identical).
    """

    def __init__(self, seconds: float = 0.5) -> None:
        self.seconds = seconds

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        time.sleep(self.seconds)


class SignalAt(Callback):
    """Send ``signal_name`` to this process after training step ``step`` (an in-process preemption)."""

    def __init__(self, step: int, signal_name: str = "SIGUSR1") -> None:
        self.step = step
        self.signal_name = signal_name

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        import os
        import signal

        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.Signals[self.signal_name])
