"""summary.png: the relative distance of each merge to each source, block by block (one panel per source, one
line per job, labelled with what differs between the jobs). Needs matplotlib (the sweep extra)."""

from __future__ import annotations

import logging
import math
from pathlib import Path

from .. import extras
from ..diagnostics import block_order
from ..families import schedule_name
from .labels import differing, label
from .records import Job

log = logging.getLogger("fluxrecipe")

SUMMARY_PNG = "summary.png"


def figure(jobs: list[Job], sources: list[str], title: str):
    """The plot: per source a panel, x = blocks in model order, one line per job that has diagnostics."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    jobs = [j for j in jobs if j.blocks]
    swept = differing([j.overrides for j in jobs])  # among the jobs plotted: a failed job's values would only add noise
    blocks = sorted({b for j in jobs for b in j.blocks}, key=block_order)
    width = min(24.0, max(7.0, 0.22 * len(blocks) + 3.5))
    fig, axes = plt.subplots(len(sources), 1, figsize=(width, 2.8 * len(sources) + 1.0), sharex=True, squeeze=False)
    colors = plt.get_cmap("tab10" if len(jobs) <= 10 else "viridis")
    x = list(range(len(blocks)))
    for ax, src in zip(axes[:, 0], sources):
        for i, job in enumerate(jobs):
            y = [_nan(job.blocks.get(b, {}).get(src)) for b in blocks]
            color = colors(i) if len(jobs) <= 10 else colors(i / max(1, len(jobs) - 1))
            ax.plot(x, y, marker="o", markersize=3, linewidth=1.2, color=color, label=label(swept, job.overrides) or job.name)
        ax.set_ylabel(f"distance to {src}")
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
    bottom = axes[-1, 0]
    bottom.set_xticks(x)
    bottom.set_xticklabels([schedule_name(b) for b in blocks], rotation=90, fontsize=7)
    bottom.set_xlabel("block (as schedules name it)")
    fig.suptitle(f"Sweep {title}: relative L2 distance of each merge to each source, per block")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, title="job")
    fig.tight_layout()
    return fig


def _nan(value: float | None) -> float:
    return math.nan if value is None else value


def draw(jobs: list[Job], sources: list[str], title: str, path: Path) -> bool:
    """summary.png at `path`; False (and a warning naming the extra) without matplotlib."""
    if message := extras.missing("summary.png"):
        log.warning(f"fluxrecipe: no summary.png: {message}")
        return False
    from matplotlib import pyplot as plt

    fig = figure(jobs, sources, title)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True
