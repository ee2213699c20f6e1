"""Prompt / mask overlays for W&B panels, reports and ``ppd.predict``."""

from __future__ import annotations

from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402


def draw_prompts(
    ax: Any,
    image: np.ndarray,
    mask: np.ndarray | None,
    points: np.ndarray,
    labels: np.ndarray,
    removed: np.ndarray | None = None,
    title: str = "",
    gt: np.ndarray | None = None,
) -> None:
    """Draw an image, the GT and predicted mask contours and point prompts on a matplotlib axis.

    Args:
        ax: matplotlib axis.
        image: ``(H, W, 3)`` uint8.
        mask: ``(H, W)`` bool predicted mask (contour drawn in yellow) or None.
        points: ``(K, 2)`` kept prompts ``(x, y)`` in pixels.
        labels: ``(K,)`` 1 positive (green star), 0 negative (red cross).
        removed: ``(R, 2)`` removed prompts (grey circles) or None.
        title: axis title.
        gt: ``(H, W)`` bool ground-truth mask (dashed cyan contour) or None.
    """
    ax.imshow(image)
    if mask is not None and mask.any():
        ax.contour(mask.astype(float), levels=[0.5], colors="yellow", linewidths=1.5)
    if gt is not None and gt.any():  # on top: stays visible under a ragged prediction
        ax.contour(gt.astype(float), levels=[0.5], colors="cyan", linewidths=1.6, linestyles="dashed")
    points = np.asarray(points).reshape(-1, 2)
    labels = np.asarray(labels).reshape(-1)
    pos, neg = points[labels == 1], points[labels == 0]
    ax.scatter(pos[:, 0], pos[:, 1], marker="*", s=90, c="lime", edgecolors="black", linewidths=0.6)
    ax.scatter(neg[:, 0], neg[:, 1], marker="X", s=60, c="red", edgecolors="black", linewidths=0.6)
    if removed is not None and len(removed):
        r = np.asarray(removed).reshape(-1, 2)
        ax.scatter(r[:, 0], r[:, 1], marker="o", s=60, facecolors="none", edgecolors="white", linewidths=1.2)
    ax.set_title(title, fontsize=9)
    ax.axis("off")


def png_bytes(image: Any) -> bytes:
    """PNG encoding of a PIL image."""
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def figure_to_array(fig: Any) -> np.ndarray:
    """Render a matplotlib figure to an ``(H, W, 3)`` uint8 array and close it."""
    fig.canvas.draw()
    arr = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return arr


def episode_panel(env: Any, image_id: int, ideal: torch.Tensor, dm: Any) -> np.ndarray:
    """Panels (ideal prompts / current state) for one image of the current training episode.

    Each panel shows the GT contour (dashed cyan), the predicted mask's contour (yellow), the prompts, and
    the full-resolution Dice of the prediction in its title. Uses the env's current state as the last panel
    and the datamodule's training data for the image.

    Returns:
        ``(H, W, 3)`` uint8 image of the figure.
    """
    from ppd.env.prompt_env import dice_score
    from ppd.env.prompts import status_to_points

    stem = dm.train_stems[image_id]
    sample = dm.train_sample(image_id)
    h, w = sample.mask.shape
    i = (env.image_ids == image_id).nonzero()[0, 0]
    states = {"ideal": ideal, "current": env.status[i]}
    gt = np.asarray(sample.mask).astype(bool)
    fig, axes = plt.subplots(1, len(states), figsize=(4 * len(states), 4.3))
    for ax, (name, st) in zip(np.atleast_1d(axes), states.items(), strict=True):
        pts, lab = status_to_points(st, env.grid, h, w)
        pred = env.full_resolution_mask(image_id, st).numpy()
        dice = float(dice_score(torch.from_numpy(pred)[None], torch.from_numpy(gt)[None])[0])
        draw_prompts(
            ax, sample.image, pred, pts.numpy(), lab.numpy(), title=f"{name}: Dice {dice:.3f}", gt=gt
        )
    fig.suptitle(f"{stem}  (cyan dashed: GT, yellow: prediction)", fontsize=9)
    fig.tight_layout()
    return figure_to_array(fig)


def write_episode_panel(
    loggers: list[Any], root_dir: str, env: Any, ideal: torch.Tensor, dm: Any, episode: int, step: int
) -> None:
    """The first image of the training episode as a panel: to every W&B logger and ``<root>/panels/*.png``.

    The PNG copy is what ``python -m ppd.report`` shows to users without W&B.

    Args:
        loggers: the trainer's loggers; root_dir: the run folder.
        env: the training env (its current state is the episode's last); ideal: ``(N,)`` the image's ideal prompts.
        dm: the data module (training images); episode / step: for the caption and the file name.
    """
    import os

    from lightning.pytorch.loggers import WandbLogger
    from PIL import Image

    from ppd.io import atomic_write_bytes

    panel = episode_panel(env, int(env.image_ids[0]), ideal, dm)
    caption = f"episode {episode}, step {step}"
    for lg in loggers:
        if isinstance(lg, WandbLogger):
            lg.log_image(key="train/episode_panel", images=[panel], caption=[caption])
    out = os.path.join(str(root_dir), "panels", f"episode_{episode:05d}.png")
    atomic_write_bytes(out, png_bytes(Image.fromarray(panel)))
