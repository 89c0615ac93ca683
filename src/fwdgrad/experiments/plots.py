"""Figures of the commands, written atomically (the library itself never plots)."""

from __future__ import annotations

from fwdgrad.train.atomic import replacing


def save_figure(figure, path: str, dpi: int = 120) -> str:
    """Save a matplotlib figure as PNG atomically and close it; returns ``path``."""
    import matplotlib.pyplot as plt  # when a figure is saved: the commands start faster

    try:
        with replacing(path) as temporary:
            figure.savefig(temporary, format="png", dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(figure)
    return path
