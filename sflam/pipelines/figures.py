"""Saving matplotlib figures the way every output is written: atomically, as PNG, the figure closed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sflam.platform.files import atomic_path


def save_figure(fig: Any, path: Path, title: str | None = None) -> Path:
    """Title, tight layout, PNG written through a temporary file and renamed; the figure is closed."""
    import matplotlib.pyplot as plt

    if title is not None:
        fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path
