"""Exploration schedules."""

from __future__ import annotations

__all__ = ["LinearSchedule"]


class LinearSchedule:
    """Linear interpolation from ``start`` to ``end`` over ``steps`` steps, constant ``end`` afterwards.

    ``value(0) == start``, ``value(steps) == end``; negative steps return ``start``.

    Args:
        start: value at step 0 (epsilon: 1.0 in the paper).
        end: value from step ``steps`` on (epsilon: 0.1 in the paper).
        steps: length of the ramp (>= 0; 0 means constant ``end``). The default 10000 is a placeholder:
            set it from the run length (e.g. the total number of environment steps to anneal over).
    """

    def __init__(self, start: float = 1.0, end: float = 0.1, steps: int = 10_000) -> None:
        if steps < 0:
            raise ValueError(f"LinearSchedule: steps must be >= 0, got {steps}")
        self.start = float(start)
        self.end = float(end)
        self.steps = int(steps)

    def value(self, step: int) -> float:
        """Schedule value at ``step`` (global step counter)."""
        if self.steps == 0 or step >= self.steps:
            return self.end
        if step <= 0:
            return self.start
        return self.start + (self.end - self.start) * (step / self.steps)

    __call__ = value

    def __repr__(self) -> str:
        return f"LinearSchedule(start={self.start}, end={self.end}, steps={self.steps})"
