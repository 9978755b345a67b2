"""One figure style for every notebook; plotting functions take ``ax=None`` and return the axes.

Multi-panel composition belongs to the notebooks; :func:`savefig` writes ``fig_NN_name.{png,pdf}``
with TrueType fonts and stable bytes (no creation dates), so a re-run that changes nothing
produces no diff; each file carries the git commit it came from (PNG ``Comment`` text chunk, PDF
``Subject``). :func:`publish` saves *and* displays the figure in the notebook's output, so every
figure a notebook writes is also visible in the rendered notebook. The backend is left to the
environment (inline in a Jupyter kernel, Agg headless), never forced.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#17becf"]


def style() -> None:
    """Apply the project style (call once per notebook)."""
    plt.rcParams.update({
        "figure.dpi": 110, "savefig.dpi": 150, "savefig.bbox": "tight",
        "font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "legend.fontsize": 8,
        "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.3,
        "axes.prop_cycle": matplotlib.cycler(color=PALETTE),
        "pdf.fonttype": 42, "ps.fonttype": 42, "svg.hashsalt": "crosskv",
    })


def _axes(ax, figsize=(4.5, 3.2)):
    if ax is None:
        _, ax = plt.subplots(figsize=figsize)
    return ax


def provenance(commit: str | None = None) -> str:
    """``crosskv commit <sha>[+dirty]`` for ``commit`` (default: the checkout's HEAD), or ``crosskv commit unknown``."""
    from crosskv.run.results import git_commit

    return f"crosskv commit {commit or git_commit() or 'unknown'}"


def savefig(fig, name: str, figures_dir: str | Path, commit: str | None = None) -> list[Path]:
    """Save ``fig`` as ``<figures_dir>/<name>.png`` and ``.pdf`` with reproducible bytes (for one commit) and the
    commit it came from in the metadata (``commit`` defaults to the checkout's HEAD); returns the paths."""
    if not name.startswith("fig_"):
        raise ValueError(f"figure name {name!r} must start with 'fig_NN_'")
    out = Path(figures_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.png", out / f"{name}.pdf"]
    stamp = provenance(commit)
    fig.savefig(paths[0], metadata={"Software": None, "Comment": stamp})
    fig.savefig(paths[1], metadata={"CreationDate": None, "ModDate": None, "Producer": None, "Creator": None,
                                    "Subject": stamp})
    return paths


def publish(fig, name: str, figures_dir: str | Path) -> list[Path]:
    """:func:`savefig`, then show ``fig`` in the notebook output (an image output per written figure) and close it."""
    paths = savefig(fig, name, figures_dir)
    try:
        from IPython import get_ipython
        from IPython.display import display
    except ImportError:  # pragma: no cover
        get_ipython = None
    if get_ipython is not None and get_ipython() is not None:
        display(fig)
    plt.close(fig)
    return paths


def heatmap(matrix, ax=None, title: str = "", cmap: str | None = None, vmin=None, vmax=None,
            label: str = "", tick_every: int = 5):
    """Layer × layer matrix ``(L, L)`` as an image with a colour bar labelled ``label``.

    Without ``cmap``, a matrix with negative entries gets a diverging map centred on zero (``RdBu_r``,
    limits ±max|value| unless given), otherwise ``viridis``.
    """
    ax = _axes(ax, (3.6, 3.2))
    data = np.asarray(matrix, dtype=float)
    if cmap is None and np.nanmin(data) < 0:
        bound = float(np.nanmax(np.abs(data)))
        cmap, vmin, vmax = "RdBu_r", -bound if vmin is None else vmin, bound if vmax is None else vmax
    im = ax.imshow(data, cmap=cmap or "viridis", vmin=vmin, vmax=vmax, origin="upper")
    ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label=label)
    ticks = np.arange(0, data.shape[0], tick_every)
    ax.set_xticks(ticks)
    ax.set_yticks(ticks)
    ax.set_xlabel("layer")
    ax.set_ylabel("layer")
    ax.grid(False)
    ax.set_title(title)
    return ax


def lines(df: pd.DataFrame, x: str, y: str, hue: str | None = None, ax=None, marker: str = "o",
          title: str = "", xlabel: str | None = None, ylabel: str | None = None, logy: bool = False,
          reference: float | None = None, reference_label: str = "full", band: tuple[str, str] | None = None,
          reference_band: tuple[float, float] | None = None):
    """``y`` against ``x``, one line per ``hue`` value (sorted by ``x``); optional horizontal reference.

    ``band=(lo, hi)`` shades the columns ``lo``..``hi`` around each line (an interval or a spread);
    ``reference_band`` shades an interval around the reference line.
    """
    ax = _axes(ax)
    groups = [(None, df)] if hue is None else df.groupby(hue, sort=True)
    for key, part in groups:
        part = part.sort_values(x)
        line, = ax.plot(part[x], part[y], marker=marker, label=None if key is None else str(key))
        if band is not None:
            ax.fill_between(part[x], part[band[0]], part[band[1]], color=line.get_color(), alpha=0.18, lw=0)
    if reference is not None:
        ax.axhline(reference, color="k", ls="--", lw=0.8, label=reference_label)
        if reference_band is not None:
            ax.axhspan(*reference_band, color="k", alpha=0.08, lw=0)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel or x)
    ax.set_ylabel(ylabel or y)
    ax.set_title(title)
    if hue is not None or reference is not None:
        ax.legend(frameon=False)
    return ax


def bars(df: pd.DataFrame, x: str, y: str, ax=None, title: str = "", ylabel: str | None = None, rotate: int = 0):
    """One bar per row of ``df``."""
    ax = _axes(ax)
    ax.bar(df[x].astype(str), df[y], color=PALETTE[0])
    ax.set_ylabel(ylabel or y)
    ax.set_title(title)
    ax.tick_params(axis="x", rotation=rotate)
    return ax


def interval_lines(df: pd.DataFrame, x: str, hue: str, ax=None, title: str = "", xlabel: str | None = None,
                   ylabel: str = "score", band: tuple[float, float, str] | None = None, logx: bool = False,
                   logy: bool = False, line: bool = True):
    """``score`` with its 95 % interval (``score_lo``–``score_hi`` as error bars) against ``x``, one series per
    ``hue`` value (sorted by ``x``); ``band = (lo, hi, label)`` shades a reference interval (e.g. the full cache)."""
    ax = _axes(ax)
    for key, part in df.groupby(hue, sort=False):
        part = part.sort_values(x)
        score = part["score"].to_numpy(float)
        err = [score - part["score_lo"].to_numpy(float), part["score_hi"].to_numpy(float) - score]
        ax.errorbar(part[x].to_numpy(), score, yerr=err, marker="o", ls="-" if line else "none", capsize=2,
                    label=str(key))
    if band is not None:
        ax.axhspan(band[0], band[1], color="0.85", zorder=0, label=band[2])
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel or x)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return ax
