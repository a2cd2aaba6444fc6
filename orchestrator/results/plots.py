"""Training curves with the best epoch marked: a PNG people would rather look at than read."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any


def training_curves_png(history: Sequence[Mapping[str, Any]], monitor: str,
                        best_epoch: int | None, by_steps: bool = False) -> bytes:
    """Losses and the monitor over the epochs (over the global steps: ``by_steps``, where
    ``best_epoch`` is the best evaluation's global step)."""
    import matplotlib

    matplotlib.use("Agg")  # no display, and never a GUI backend in a Ray process
    import matplotlib.pyplot as plt

    axis = "global_step" if by_steps else "epoch"
    epochs = [h.get(axis, h["epoch"]) for h in history]
    losses = [k for k in ("train_loss", "val_loss") if k in history[0]]
    panels = [losses] + ([[monitor]] if monitor not in losses else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.8), squeeze=False)
    for ax, keys in zip(axes[0], panels, strict=True):
        for key in keys:
            ax.plot(epochs, [h.get(key) for h in history], marker="o", ms=3, label=key)
        if best_epoch is not None:
            ax.axvline(best_epoch, color="tab:red", ls="--", lw=1,
                       label=f"best {axis.replace('_', ' ')} {best_epoch}")
        ax.set_xlabel(axis.replace("_", " "))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_title("loss")
    if len(panels) > 1:
        axes[0][1].set_title(f"{monitor} (monitored)")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()
