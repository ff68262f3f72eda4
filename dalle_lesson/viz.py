"""Plotting helpers the notebooks share: image grids with captions, curves, masks."""

from __future__ import annotations

import math
import textwrap
from typing import Sequence

import matplotlib.pyplot as plt
import torch


def _as_image(image: torch.Tensor):
    """A [3, H, W] (or [H, W]) tensor in [0, 1] as something ``imshow`` draws."""
    image = image.detach().float().cpu().clamp(0, 1)
    return image.permute(1, 2, 0).numpy() if image.dim() == 3 else image.numpy()


def show_grid(
    images: torch.Tensor | Sequence[torch.Tensor],
    captions: Sequence[str] | None = None,
    ncols: int | None = None,
    title: str | None = None,
    cell_inches: float = 1.6,
    wrap: int = 22,
):
    """Draw images (a [B, 3, H, W] tensor in [0, 1] or a list of them) in a grid.

    Captions go above their images, wrapped to ``wrap`` characters. Returns the figure.
    """
    images = list(images)
    if not images:
        raise ValueError("show_grid needs at least one image")
    ncols = ncols or min(len(images), 8)
    nrows = math.ceil(len(images) / ncols)
    caption_lines = max((len(textwrap.wrap(c, wrap)) for c in captions), default=0) if captions else 0
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(ncols * cell_inches, nrows * (cell_inches + 0.17 * caption_lines)), squeeze=False,
        layout="constrained",  # keeps every caption clear of the image above it (tight_layout does not)
    )
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k < len(images):
            ax.imshow(_as_image(images[k]), interpolation="nearest")
            if captions:
                ax.set_title("\n".join(textwrap.wrap(captions[k], wrap)), fontsize=7)
    if title:
        fig.suptitle(title)
    return fig


def save_grid(images, path: str, captions: Sequence[str] | None = None, **kwargs) -> str:
    """Draw a grid with :func:`show_grid` and save it to ``path`` (PNG); returns the path."""
    fig = show_grid(images, captions, **kwargs)
    fig.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_curve(values: Sequence[float], title: str = "", xlabel: str = "step", ylabel: str = "loss",
               smooth: int = 1, ax=None, label: str | None = None, steps: Sequence[int] | None = None):
    """A training curve, optionally smoothed by a running mean over ``smooth`` points.

    ``steps``: the step of each value (a training log's ``"step"`` column); default 0, 1, 2, ...
    """
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 3))
    values = torch.as_tensor(list(values), dtype=torch.float64)
    steps = torch.as_tensor(list(steps) if steps is not None else range(len(values)))
    if smooth > 1 and len(values) >= smooth:
        kernel = torch.ones(smooth, dtype=torch.float64) / smooth
        values = torch.nn.functional.conv1d(values.view(1, 1, -1), kernel.view(1, 1, -1)).flatten()
        steps = steps[smooth - 1 :]
    ax.plot(steps.numpy(), values.numpy(), label=label)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if label:
        ax.legend()
    return ax


def show_codes(codes: torch.Tensor, ax=None, title: str = "", annotate: bool = True):
    """Draw an [h, w] grid of integer token ids, each cell labelled with its id."""
    if ax is None:
        _, ax = plt.subplots(figsize=(4, 4))
    codes = codes.detach().cpu()
    ax.imshow(codes.numpy(), cmap="tab20", interpolation="nearest")
    if annotate and codes.numel() <= 256:
        for (row, column), value in zip(torch.cartesian_prod(torch.arange(codes.shape[0]), torch.arange(codes.shape[1])).tolist(), codes.flatten().tolist()):
            ax.text(column, row, str(value), ha="center", va="center", fontsize=6)
    ax.set(title=title, xticks=[], yticks=[])
    return ax
