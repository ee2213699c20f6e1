"""Reinforcement-learning utilities: replay buffer, TD losses, schedules."""

from ppd.rl.losses import double_dqn_next_value, dqn_next_value, td_loss, td_target
from ppd.rl.replay import ReplayBuffer
from ppd.rl.schedules import LinearSchedule

__all__ = [
    "ReplayBuffer",
    "LinearSchedule",
    "td_target",
    "td_loss",
    "dqn_next_value",
    "double_dqn_next_value",
]
