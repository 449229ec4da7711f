"""Figures of the fusion experiments (matplotlib, written as PNG): grouped bars, lines along a
path or over layers. Each takes plain numbers (from the results JSON) and a file name."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no screen
import matplotlib.pyplot as plt


def bars(
    path: str | Path,
    groups: Sequence[str],
    series: Mapping[str, Sequence[float]],
    *,
    errors: Mapping[str, Sequence[float]] | None = None,
    ylabel: str,
    title: str,
    reference: Mapping[str, float] | None = None,
) -> Path:
    """Grouped bars: one group per entry of ``groups``, one bar per series (mean ± error)."""
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(groups) * max(1, len(series)) / 2), 3.6))
    width = 0.8 / max(len(series), 1)
    for i, (name, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        err = None if errors is None else errors.get(name)
        ax.bar(xs, values, width, yerr=err, label=name, capsize=2)
    for name, value in (reference or {}).items():
        ax.axhline(value, linestyle="--", linewidth=1, color="gray")
        ax.text(len(groups) - 0.5, value, f" {name}", va="bottom", ha="right", fontsize=8)
    ax.set_xticks(range(len(groups)), groups, rotation=15, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, ncols=min(len(series), 4))
    return _save(fig, path)


def lines(
    path: str | Path,
    x: Sequence[float],
    series: Mapping[str, Sequence[float]],
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    panels: Mapping[str, Mapping[str, Sequence[float]]] | None = None,
) -> Path:
    """Lines over ``x`` (e.g. λ along a path, or layers); ``panels`` adds more side by side
    (panel title -> its series), sharing x."""
    all_panels = {ylabel: series, **(panels or {})}
    fig, axes = plt.subplots(1, len(all_panels), figsize=(4.2 * len(all_panels), 3.4))
    axes = [axes] if len(all_panels) == 1 else list(axes)
    for ax, (label, panel) in zip(axes, all_panels.items(), strict=True):
        for name, values in panel.items():
            ax.plot(x, values, marker="o", markersize=3, label=name)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
