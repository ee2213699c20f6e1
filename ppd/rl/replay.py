"""Compact ring-buffer replay memory for the prompt-refinement DQNs.

A transition stores only what changes between states: the graph of an image is static and is rebuilt by
the environment from ``image_id`` (``PromptEnv.observe(image_ids, statuses) -> Batch``), so the buffer
holds prompt states, not graphs, and stays free of PyG.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["ReplayBuffer"]

_FIELDS: dict[str, torch.dtype] = {
    "image_id": torch.long,
    "status": torch.int8,
    "action": torch.long,
    "reward": torch.float32,
    "next_status": torch.int8,
    "done": torch.bool,
}
_PER_NODE = ("status", "next_status")


class ReplayBuffer:
    """Preallocated uniform replay buffer (ring: the oldest transitions are overwritten first).

    Storage per transition: ``image_id`` long, ``status (N,)`` int8, ``action`` long (graph-local flat
    action), ``reward`` float32, ``next_status (N,)`` int8, ``done`` bool.

    Args:
        capacity: maximum number of transitions.
        num_nodes: nodes per graph ``N = G * G`` (fixed for a run).
    """

    def __init__(self, capacity: int, num_nodes: int) -> None:
        if capacity <= 0 or num_nodes <= 0:
            raise ValueError(f"ReplayBuffer: capacity and num_nodes must be > 0, got {capacity}, {num_nodes}")
        self.capacity = int(capacity)
        self.num_nodes = int(num_nodes)
        self._data: dict[str, Tensor] = {
            name: torch.zeros(self._shape(name), dtype=dtype) for name, dtype in _FIELDS.items()
        }
        self._pos = 0  # next slot to write
        self._size = 0  # number of filled slots

    def _shape(self, name: str) -> tuple[int, ...]:
        return (self.capacity, self.num_nodes) if name in _PER_NODE else (self.capacity,)

    def __len__(self) -> int:
        return self._size

    @property
    def position(self) -> int:
        """Index of the next slot to be written."""
        return self._pos

    def add_batch(
        self,
        image_id: Tensor,
        status: Tensor,
        action: Tensor,
        reward: Tensor,
        next_status: Tensor,
        done: Tensor,
    ) -> None:
        """Append B transitions (if B > capacity only the last ``capacity`` are kept).

        Args:
            image_id: ``(B,)`` integer image ids.
            status: ``(B, N)`` prompt states before the action (values 0/1/2).
            action: ``(B,)`` graph-local flat actions.
            reward: ``(B,)`` rewards.
            next_status: ``(B, N)`` prompt states after the action.
            done: ``(B,)`` episode-end flags.
        """
        items = {
            "image_id": image_id,
            "status": status,
            "action": action,
            "reward": reward,
            "next_status": next_status,
            "done": done,
        }
        image_id = torch.as_tensor(image_id)
        if image_id.dim() != 1:
            raise ValueError(
                f"ReplayBuffer.add_batch: image_id must have shape (B,), got {tuple(image_id.shape)}"
            )
        b = image_id.shape[0]
        for name, value in items.items():
            value = torch.as_tensor(value)
            expected = (b, self.num_nodes) if name in _PER_NODE else (b,)
            if tuple(value.shape) != expected:
                raise ValueError(
                    f"ReplayBuffer.add_batch: field {name!r} must have shape {expected}, got {tuple(value.shape)}"
                )
            if value.is_floating_point() and name != "reward":
                raise ValueError(
                    f"ReplayBuffer.add_batch: field {name!r} must be integer/bool, got {value.dtype}"
                )
            if name in _PER_NODE and value.numel() and (int(value.min()) < 0 or int(value.max()) > 2):
                raise ValueError(f"ReplayBuffer.add_batch: field {name!r} must hold prompt states 0/1/2")
            items[name] = value.detach().to("cpu", _FIELDS[name])
        if b == 0:
            return
        if b > self.capacity:
            items = {name: value[-self.capacity :] for name, value in items.items()}
            self._pos = (self._pos + b - self.capacity) % self.capacity
            b = self.capacity
        idx = (self._pos + torch.arange(b)) % self.capacity
        for name, value in items.items():
            self._data[name][idx] = value
        self._pos = (self._pos + b) % self.capacity
        self._size = min(self._size + b, self.capacity)

    def add(
        self, image_id: int, status: Tensor, action: int, reward: float, next_status: Tensor, done: bool
    ) -> None:
        """Append one transition (``status``/``next_status`` of shape ``(N,)``)."""
        self.add_batch(
            torch.tensor([image_id]),
            torch.as_tensor(status).unsqueeze(0),
            torch.tensor([action]),
            torch.tensor([reward]),
            torch.as_tensor(next_status).unsqueeze(0),
            torch.tensor([done]),
        )

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Uniform sample with replacement among the filled slots.

        Args:
            batch_size: number of transitions.
            generator: CPU RNG (None: global RNG).

        Returns:
            Dict with ``image_id (S,)`` long, ``status (S, N)`` int8, ``action (S,)`` long,
            ``reward (S,)`` float32, ``next_status (S, N)`` int8, ``done (S,)`` bool and ``index (S,)``
            (buffer slots, for debugging).
        """
        if self._size == 0:
            raise ValueError("ReplayBuffer.sample: the buffer is empty")
        if batch_size <= 0:
            raise ValueError(f"ReplayBuffer.sample: batch_size must be > 0, got {batch_size}")
        idx = torch.randint(0, self._size, (batch_size,), generator=generator)
        # When the ring has not wrapped, filled slots are 0.._size-1; once full, all slots are filled.
        out = {name: tensor[idx] for name, tensor in self._data.items()}
        out["index"] = idx
        return out

    def state_dict(self) -> dict[str, Tensor]:
        """Plain tensors (``torch.load(weights_only=True)``-safe), including capacity, position and size."""
        state = {name: tensor[: self._size].clone() for name, tensor in self._data.items()}
        state["capacity"] = torch.tensor(self.capacity)
        state["num_nodes"] = torch.tensor(self.num_nodes)
        state["position"] = torch.tensor(self._pos)
        state["size"] = torch.tensor(self._size)
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore from :meth:`state_dict` (capacity and num_nodes must match this buffer)."""
        missing = [k for k in (*_FIELDS, "capacity", "num_nodes", "position", "size") if k not in state]
        if missing:
            raise ValueError(f"ReplayBuffer.load_state_dict: missing keys {missing}")
        cap, nodes = int(state["capacity"]), int(state["num_nodes"])
        if (cap, nodes) != (self.capacity, self.num_nodes):
            raise ValueError(
                f"ReplayBuffer.load_state_dict: state has capacity={cap}, num_nodes={nodes}; this buffer has "
                f"capacity={self.capacity}, num_nodes={self.num_nodes}"
            )
        size, pos = int(state["size"]), int(state["position"])
        if not (0 <= size <= cap and 0 <= pos < cap):
            raise ValueError(f"ReplayBuffer.load_state_dict: invalid size={size} / position={pos}")
        for name, dtype in _FIELDS.items():
            value = state[name]
            expected = (size, nodes) if name in _PER_NODE else (size,)
            if tuple(value.shape) != expected:
                raise ValueError(
                    f"ReplayBuffer.load_state_dict: field {name!r} must have shape {expected}, got "
                    f"{tuple(value.shape)}"
                )
            self._data[name].zero_()
            self._data[name][:size] = value.to(dtype)
        self._size, self._pos = size, pos
