"""The two roles of the prompt game as records: outputs per node, action mask, step function, reward sign.

The one definition of what an attacker or a defender may do, used by the environment
(:meth:`ppd.env.prompt_env.PromptEnv.step`, its PyG observations), the learners, the roll-outs and the
evaluation rows. Code that needs the role takes a :class:`Role` (or its name, through :func:`get_role`)
instead of branching on the role string.

Flat action layout (as :mod:`ppd.models.qnet`): action ``a`` of a state addresses node ``a // K`` and output
``a % K`` of that node, ``K = outputs_per_node``:

* attacker (``K = 2``): activate inactive node ``a // 2`` as positive (``a % 2 == 0``) or negative; reward
  ``-(Dice_after - Dice_before)``;
* defender (``K = 1``): deactivate active node ``a``; reward ``Dice_after - Dice_before``.

Also here: the GT label rule :func:`wrong_labels` (which active prompts carry the wrong label), used by the
oracle margin loss and the ``oracle_label`` evaluation row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ppd.types import INACTIVE, NEGATIVE, POSITIVE, ROLES

__all__ = ["Role", "ATTACK", "DEFEND", "get_role", "wrong_labels"]


@dataclass(frozen=True)
class Role:
    """One side of the prompt game.

    Attributes:
        name: ``attack`` or ``defend`` (the keys of replay buffers, optimisers and configs).
        short: ``att`` / ``def`` (metric names such as ``train/td_loss_att``).
        outputs_per_node: Q-values per node, ``K``.
        reward_sign: reward = ``reward_sign * (Dice_after - Dice_before)``.
    """

    name: str
    short: str
    outputs_per_node: int
    reward_sign: float

    def node_mask(self, status: Tensor) -> Tensor:
        """Valid actions per node: ``(..., N)`` status -> ``(..., N, K)`` bool."""
        if self.outputs_per_node == 2:  # attacker: an inactive node, either label
            return (status == INACTIVE).unsqueeze(-1).expand(*status.shape, 2)
        return (status != INACTIVE).unsqueeze(-1)  # defender: an active node

    def mask(self, status: Tensor) -> Tensor:
        """Valid flat actions: ``(..., N)`` status -> ``(..., N * K)`` bool (a new tensor)."""
        return self.node_mask(status).reshape(*status.shape[:-1], -1).clone()

    def apply(self, status: Tensor, actions: Tensor, live: Tensor, check: bool = True) -> Tensor:
        """New states after the live episodes' actions (the one step rule of the role).

        Args:
            status: ``(B, N)`` prompt states.
            actions: ``(B,)`` flat actions (ignored where not ``live``).
            live: ``(B,)`` bool, which episodes act.
            check: raise ``ValueError`` on an invalid action of a live episode.

        Returns:
            ``(B, N)`` new states (a copy; rows that do not act are unchanged).
        """
        new = status.clone()
        rows = live.nonzero().squeeze(1)
        a = actions[rows].long()
        k = self.outputs_per_node
        if check:
            self._check(status, actions, rows)
        node = a // k
        if k == 2:
            new[rows, node] = torch.where(a % 2 == 0, POSITIVE, NEGATIVE).to(new.dtype)
        else:
            new[rows, node] = INACTIVE
        return new

    def _check(self, status: Tensor, actions: Tensor, rows: Tensor) -> None:
        n = status.shape[-1]
        k = self.outputs_per_node
        for i in rows.tolist():
            a = int(actions[i])
            node = a // k
            if 0 <= a < k * n and bool(self.node_mask(status[i, node])[0]):
                continue
            if k == 2:
                st = int(status[i, node]) if 0 <= node < n else "out of range"
                raise ValueError(f"invalid attacker action {a} for episode {i} (node {node} status {st})")
            raise ValueError(f"invalid defender action {a} for episode {i} (node not active)")


ATTACK = Role(name="attack", short="att", outputs_per_node=2, reward_sign=-1.0)
DEFEND = Role(name="defend", short="def", outputs_per_node=1, reward_sign=1.0)
_BY_NAME = {r.name: r for r in (ATTACK, DEFEND)}
assert tuple(_BY_NAME) == ROLES


def get_role(role: str | Role) -> Role:
    """The :class:`Role` of a name (a :class:`Role` is returned as is)."""
    if isinstance(role, Role):
        return role
    try:
        return _BY_NAME[role]
    except KeyError:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}") from None


def wrong_labels(status: Tensor, node_fg: Tensor) -> Tensor:
    """Active prompts whose label the GT contradicts: a positive outside the object or a negative inside.

    Args:
        status: ``(..., N)`` prompt states.
        node_fg: ``(..., N)`` bool, GT mask at each node centre.

    Returns:
        ``(..., N)`` bool.
    """
    return ((status == POSITIVE) & ~node_fg) | ((status == NEGATIVE) & node_fg)
