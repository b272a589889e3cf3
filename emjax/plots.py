"""What every plot of the study shares: undefined values are marked as such, never drawn as 0."""

from __future__ import annotations

from emjax.geometry import save_figure

NO_DATA = "no data"


def no_data(ax, x: float | None = None, *, message: str = NO_DATA) -> None:
    """Mark undefined values on `ax`: at data position `x` (one bar or point of several), else the whole axes
    (its ticks removed, so no scale suggests a value)."""
    if x is not None:
        ax.annotate(message, (x, 0), xycoords=("data", "axes fraction"), xytext=(0, 4), textcoords="offset points",
                    ha="center", va="bottom", rotation=90, fontsize=8, color="0.4")  # fmt: skip
        return
    ax.text(0.5, 0.5, message, transform=ax.transAxes, ha="center", va="center", fontsize=11, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def save(fig, path) -> None:
    """The figure as an image at `path`, written atomically."""
    save_figure(fig, path)
