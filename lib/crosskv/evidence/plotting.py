"""One figure style for every notebook; plotting functions take ``ax=None`` and return the axes.

Multi-panel composition belongs to the notebooks; :func:`savefig` writes ``fig_NN_name.{png,pdf}``
with TrueType fonts and stable bytes (no creation dates), so a re-run that changes nothing
produces no diff; each file carries the git commit it came from (PNG ``Comment`` text chunk, PDF
``Subject``). :func:`publish` saves *and* displays the figure in the notebook's output, so every
figure a notebook writes is also visible in the rendered notebook. The backend is left to the
environment (inline in a Jupyter kernel, Agg headless), never forced.

One visual language: :data:`FAMILIES` is the one table of the palette — a fixed colour and marker per
method family in every notebook, hue groups by kind (cross-layer families in blues and purples, eviction
in reds and oranges, quantization in greens, compositions in browns, the full cache in black), and the
panel a family is drawn in when a chart is split into small multiples (at most 8 series per panel).
:func:`style_of` resolves a run label (``"xKV G=4 @0.25"``) to its family's style. :func:`frontier`
draws quality against held kept in small multiples by panel, the full cache as a band, the papers'
converted points as hollow markers labelled with the paper's model, and a perplexity axis clipped to the
informative range with off-scale points marked at the edge (their values written beside them); legends sit
outside the data, where no other panel covers them.

Legibility: titles wrap to their panel's width (:func:`fit_title`); labels that would overlap are moved apart
(:func:`declutter`); markers of different series at nearly the same x are spread a little sideways
(:func:`dodge`, a display offset only — tables keep the measured x); several families at exactly 0 on an
accuracy axis are drawn one row per family in a strip under 0 (:func:`floor_rows`).
"""
from __future__ import annotations

import textwrap

from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import matplotlib.ticker
import numpy as np
import pandas as pd

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#17becf"]

SHARING, LOW_RANK, EVICTION, QUANTIZATION = ("cross-layer: sharing and merging", "cross-layer: low rank", "eviction",
                                             "quantization and compositions")
PANELS = (SHARING, LOW_RANK, EVICTION, QUANTIZATION)
# family → (hue group, panel, colour, marker): the one palette table of every notebook
FAMILIES = pd.DataFrame([
    ("full", "reference", None, "#000000", "o"),
    ("KVSharer", "cross-layer", SHARING, "#08306b", "s"),
    ("KVSharer (cosine T test)", "cross-layer", SHARING, "#2171b5", "P"),
    ("KVSharer (KL test)", "cross-layer", SHARING, "#6baed6", "X"),
    ("KVSharer + xKV G=4", "cross-layer", SHARING, "#54278f", "*"),
    ("MiniCache (paper reading)", "cross-layer", SHARING, "#1c9099", "v"),
    ("MiniCache (xkv reading)", "cross-layer", SHARING, "#67a9cf", "^"),
    ("CommonKV", "cross-layer", SHARING, "#3f007d", "D"),
    ("Single SVD", "cross-layer", LOW_RANK, "#9e9ac8", "o"),
    ("xKV G=2", "cross-layer", LOW_RANK, "#807dba", "<"),
    ("xKV G=4", "cross-layer", LOW_RANK, "#6a51a3", ">"),
    ("xKV G=8", "cross-layer", LOW_RANK, "#4a1486", "h"),
    ("Selective reconstruction", "cross-layer", LOW_RANK, "#016c59", "p"),
    ("SnapKV", "eviction", EVICTION, "#d62728", "o"),
    ("PyramidKV", "eviction", EVICTION, "#fc8d59", "s"),
    ("StreamingLLM", "eviction", EVICTION, "#b30000", "^"),
    ("KNorm", "eviction", EVICTION, "#fdbb84", "v"),
    ("ExpectedAttention", "eviction", EVICTION, "#e34a33", "D"),
    ("KIVI 8-bit", "quantization", QUANTIZATION, "#a1d99b", "o"),
    ("KIVI 4-bit", "quantization", QUANTIZATION, "#41ab5d", "s"),
    ("KIVI 2-bit", "quantization", QUANTIZATION, "#005a32", "D"),
    ("composition", "composition", QUANTIZATION, "#8c510a", "*"),
], columns=["family", "group", "panel", "color", "marker"]).set_index("family")
# KVSharer candidate orders (one colour each in every panel; the paper's rule in KVSharer's colour)
ORDERS = {"dissimilar": "#08306b", "similar": "#e6550d", "random": "#969696"}
# label prefixes of the notebooks' run labels that name a family differently
_ALIASES = {"MiniCache": "MiniCache (paper reading)", "KIVI": "KIVI 2-bit", "selective": "Selective reconstruction"}


def family_for(label: str) -> str:
    """The :data:`FAMILIES` row of a run or family label: exact, a composition (``→`` or ``×`` in it), else the
    longest family name (or alias) it starts with; ``ValueError`` for a label no family claims."""
    if label in FAMILIES.index:
        return label
    if "→" in label or " × " in label:
        return "composition"
    names = [f for f in [*FAMILIES.index, *_ALIASES] if label.startswith(f)]
    if not names:
        raise ValueError(f"no family in plotting.FAMILIES for label {label!r}; add a row to the table")
    best = max(names, key=len)
    return _ALIASES.get(best, best)


def style_of(label: str) -> dict[str, str]:
    """``{"color", "marker"}`` of the family of ``label`` (:func:`family_for`)."""
    row = FAMILIES.loc[family_for(label)]
    return {"color": row["color"], "marker": row["marker"]}


def series_styles(labels) -> dict[str, dict[str, str]]:
    """A style per label: its family's colour and marker; several labels of one family get shades from its colour
    towards light grey (in the given order) so they stay apart in one panel."""
    import seaborn as sns

    labels = list(dict.fromkeys(labels))
    by_family: dict[str, list[str]] = {}
    for label in labels:
        by_family.setdefault(family_for(label), []).append(label)
    out = {}
    for family, members in by_family.items():
        base = style_of(family)
        shades = [base["color"]] if len(members) == 1 else sns.blend_palette([base["color"], "#d0d0d0"], len(members) + 1)[:-1]
        for label, shade in zip(members, shades):
            out[label] = {"color": shade, "marker": base["marker"]}
    return out


def style() -> None:
    """Apply the project style (call once per notebook)."""
    plt.rcParams.update({
        "figure.dpi": 110, "savefig.dpi": 150, "savefig.bbox": "tight",
        "font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "legend.fontsize": 8,
        "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.3,
        "axes.prop_cycle": matplotlib.cycler(color=PALETTE),
        "pdf.fonttype": 42, "ps.fonttype": 42, "svg.hashsalt": "crosskv",
    })


def _plain_log(axis) -> None:
    from matplotlib.ticker import FuncFormatter

    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:g}".rstrip("0").rstrip(".")[-1:] in ("2", "5") else ""))


def kept_axis(ax) -> None:
    """A logarithmic kept axis with plain tick labels (0.1, 0.2, 0.5 — not 10⁻¹)."""
    ax.set_xscale("log")
    _plain_log(ax.xaxis)


def log_y(ax) -> None:
    """A logarithmic score axis (perplexity) with plain tick labels."""
    ax.set_yscale("log")
    _plain_log(ax.yaxis)


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


def publish(fig, name: str, figures_dir: str | Path) -> None:
    """:func:`savefig`, then show ``fig`` in the notebook output (an image output per written figure) and close it.
    Returns nothing, so a cell ending with it stores no echo of the paths."""
    savefig(fig, name, figures_dir)
    try:
        from IPython import get_ipython
        from IPython.display import display
    except ImportError:  # pragma: no cover
        get_ipython = None
    if get_ipython is not None and get_ipython() is not None:
        display(fig)
    plt.close(fig)


def fit_title(ax, text: str) -> None:
    """Set the title of ``ax`` wrapped at spaces to the axes' width (a title wider than its panel runs into the
    next panel's): the width after the figure's layout engine has run, else as the grid places it."""
    size = matplotlib.font_manager.FontProperties(size=plt.rcParams["axes.titlesize"]).get_size_in_points()
    engine = ax.figure.get_layout_engine()
    if engine is not None:
        engine.execute(ax.figure)
    width = ax.get_position().width * ax.figure.get_figwidth() * 72
    ax.set_title(wrap_to(text, width, size))


def wrap_to(text: str, width: float, size: float) -> str:
    """``text`` with line breaks at spaces so each line is at most ``width`` points wide at font ``size`` (a word
    longer than that keeps its own line)."""
    from matplotlib.textpath import TextPath

    def wide(line: str) -> float:
        return TextPath((0, 0), line, size=size).get_extents().width

    lines: list[str] = []
    for word in text.split(" "):
        if lines and wide(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return "\n".join(lines)


def legend_clear(ax, **kwargs):
    """The legend of ``ax`` where no other panel of its grid covers it: to the right in the last column, below
    the axes in the last row, else inside the axes (``loc="best"``)."""
    spec = ax.get_subplotspec()
    if spec is None or spec.is_last_col():
        return legend_outside(ax, **kwargs)
    if spec.is_last_row():
        return legend_outside(ax, below=True, ncol=kwargs.pop("ncol", 3), **kwargs)
    return ax.legend(loc="best", frameon=False, **kwargs)


def declutter(*axes, pad: float = 1.0, tries: int = 12) -> None:
    """In each of ``axes``, move an annotation that overlaps an earlier one (in x order) down a line at a time
    until it is clear (at most ``tries`` lines): point labels and off-scale values stay readable."""
    from matplotlib.text import Annotation

    crowded = [[t for t in ax.texts if isinstance(t, Annotation)] for ax in axes]
    if not any(len(texts) > 1 for texts in crowded):
        return
    fig = axes[0].figure
    fig.draw_without_rendering()  # final limits and layout, so extents are where they will be drawn
    points = 72 / fig.dpi
    for texts in crowded:
        placed = []
        for text in sorted(texts, key=lambda t: (t.xy[0], t.xy[1])):
            for _ in range(tries):
                box = text.get_window_extent().padded(pad)
                if not any(box.overlaps(other) for other in placed):
                    break
                dx, dy = text.xyann
                text.xyann = (dx, dy - box.height * points)
            placed.append(text.get_window_extent())


def dodge(x, series, log: bool = True, width: float = 0.012, step: float = 0.008) -> np.ndarray:
    """Display x positions that spread points of different ``series`` at nearly the same ``x`` sideways.

    Points closer than ``width`` (decades on a log axis, else x units) form a cluster; within a cluster holding
    several series, each series moves by ``step`` × its rank around the centre (in decades: a factor
    ``10**step`` ≈ 1.9 %), so markers and error bars stop covering each other. Only where things are drawn:
    tables keep the measured x. ``x``: ``(N,)``; ``series``: ``(N,)`` labels."""
    x = np.asarray(x, dtype=float)
    labels = np.asarray(series, dtype=object)
    pos = np.log10(x) if log else x.copy()
    out = pos.copy()
    order = np.argsort(pos, kind="stable")
    clusters, current = [], [order[0]] if len(order) else []
    for i, j in zip(order[:-1], order[1:]):
        if pos[j] - pos[i] < width:
            current.append(j)
        else:
            clusters.append(current)
            current = [j]
    if current:
        clusters.append(current)
    for members in clusters:
        names = list(dict.fromkeys(labels[m] for m in members))
        for m in members:
            out[m] = pos[m] + (names.index(labels[m]) - (len(names) - 1) / 2) * step
    return 10 ** out if log else out


def floor_rows(df: pd.DataFrame, step: float) -> dict[str, float]:
    """family → y offset for the families of ``df`` with a point at exactly 0 on its score and interval, when
    two or more have one: family ``k`` (in order) is drawn at ``−(k + 1)·step`` so points stacked at 0 can be
    told apart (a strip under the axis, labelled by the caller)."""
    at_zero = df[(df["score"] == 0) & (df["score_hi"] == 0)]
    families = list(dict.fromkeys(at_zero["family"]))
    if len(families) < 2:
        return {}
    return {f: -(k + 1) * step for k, f in enumerate(families)}


def legend_outside(ax, ncol: int = 1, below: bool = False, **kwargs):
    """The legend of ``ax`` outside its data: to the right (default) or below the axes."""
    handles, labels = ax.get_legend_handles_labels()
    if not handles:
        return None
    if below:
        return ax.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.42), ncol=ncol,
                         frameon=False, **kwargs)
    return ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1.0), ncol=ncol, frameon=False, **kwargs)


def clip_limits(lo, hi, reference: float, factor: float = 4.0) -> tuple[float, float]:
    """The informative range of a lower-is-better (perplexity) axis: from the lowest interval end up to
    ``factor`` × ``reference`` (the full cache's score) or twice the median interval top, whichever is higher,
    and never above the highest interval end; points above are off-scale (a few outliers do not stretch the
    axis, and a chart where most points are far above the reference still shows them)."""
    lo = np.asarray(lo, dtype=float)
    hi = np.asarray(hi, dtype=float)
    top = min(float(np.nanmax(hi)), max(factor * reference, 2 * float(np.nanmedian(hi))))
    return float(np.nanmin(lo)) / 1.1, max(top, reference) * 1.1


def _clipped_errorbar(ax, x, y, lo, hi, top: float | None, label: str, style: dict, hollow: bool = False):
    """Points with intervals; points above ``top`` drawn as an up-triangle at the edge with their value."""
    x, y, lo, hi = (np.asarray(v, dtype=float) for v in (x, y, lo, hi))
    inside = np.ones_like(y, dtype=bool) if top is None else y <= top
    face = "none" if hollow else style["color"]
    ax.errorbar(x[inside], y[inside], yerr=[y[inside] - lo[inside], np.minimum(hi[inside], top or np.inf) - y[inside]],
                marker=style["marker"], color=style["color"], mfc=face, ms=4, lw=1, capsize=2, label=label)
    for xi, yi in zip(x[~inside], y[~inside]):
        ax.plot([xi], [top], marker="^", color=style["color"], ms=6, ls="none", clip_on=False)
        ax.annotate(f"{yi:.3g}", (xi, top), xytext=(0, -9), textcoords="offset points", ha="center", fontsize=6,
                    color=style["color"])


def panels_of(df: pd.DataFrame, full: str = "full") -> list[str]:
    """The :data:`PANELS` the families of ``df`` (other than ``full``) are drawn in, in reading order."""
    present = {FAMILIES.loc[family_for(f), "panel"] for f in df["family"] if f != full}
    return [p for p in PANELS if p in present]


def frontier(df: pd.DataFrame, ylabel: str, title: str = "", papers: pd.DataFrame | None = None,
             full: str = "full", clip: float = 4.0, panel_width: float = 3.6, axes=None):
    """Small multiples of score against held kept (log x), one panel per :data:`PANELS` entry present in ``df``.

    ``df``: one row per configuration with ``family``, ``kept``, ``score``, ``score_lo``, ``score_hi``,
    ``higher_is_better`` and ``front`` (a :func:`crosskv.evidence.frontier.summary` frame). The ``full`` family
    is a band (its interval) with a line at its score in every panel; the Pareto front (``front``) a thin
    black step line; ``papers`` (``family``, ``kept``, ``score`` on this axis's scale, ``model``) hollow markers
    labelled with the paper's model. A lower-is-better axis is logarithmic and clipped (:func:`clip_limits`).
    ``axes``: one row of :func:`panels_of` axes to draw into (e.g. one row per task); else a new figure.
    Returns the figure.
    """
    higher = bool(df["higher_is_better"].iloc[0])
    ref = df[df["family"] == full]
    rest = df[df["family"] != full].assign(panel=lambda d: d["family"].map(lambda f: FAMILIES.loc[family_for(f), "panel"]))
    panels = panels_of(df, full)
    if axes is None:
        fig, axes = plt.subplots(1, len(panels), figsize=(panel_width * len(panels), 4.4), sharex=True, sharey=True,
                                 squeeze=False, layout="constrained")
    else:
        axes = np.asarray(axes).reshape(1, -1)
        if axes.shape[1] != len(panels):
            raise ValueError(f"frontier needs {len(panels)} axes (one per panel {panels}), got {axes.shape[1]}")
        fig = axes[0, 0].figure
    top = None
    if not higher and len(ref):
        low, top = clip_limits(df["score_lo"], df["score_hi"], float(ref["score"].iloc[0]), clip)
        top = top / 1.1 * 1.05
    step = 0.035 * max(1.0, float(df["score_hi"].max())) if higher else 0.0
    for ax, panel in zip(axes[0], panels):
        part = rest[rest["panel"] == panel]
        if part["family"].nunique() > 8:
            raise ValueError(f"panel {panel!r} would hold {part['family'].nunique()} series (at most 8)")
        rows = floor_rows(part, step) if higher else {}
        part = part.assign(kept=dodge(part["kept"], part["family"]) if len(part) else part["kept"])
        for _, row in ref.iterrows():
            ax.axhspan(float(row["score_lo"]), float(row["score_hi"]), color="0.88", zorder=0, lw=0,
                       label=f"{full} (95 % interval, n = {int(row['n'])})" if "n" in row else full)
            ax.axhline(float(row["score"]), color="k", lw=0.7, ls="--")
        for family, group in part.groupby("family", sort=False):
            group = group.sort_values("kept")
            shift = np.where((group["score"] == 0) & (group["score_hi"] == 0), rows.get(family, 0.0), 0.0)
            _clipped_errorbar(ax, group["kept"], group["score"] + shift, group["score_lo"] + shift,
                              group["score_hi"] + shift, top, family, style_of(family))
        if rows:
            ax.axhspan(min(rows.values()) - step / 2, -step / 2, color="0.95", zorder=0, lw=0)
            ax.annotate("at 0: one row per family", (0.01, min(rows.values()) - step / 2), xycoords=("axes fraction", "data"),
                        xytext=(0, 1), textcoords="offset points", fontsize=5, color="0.4", va="bottom")
            ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: "" if v < 0 else f"{v:g}"))
        if papers is not None and len(papers):
            for _, row in papers[papers["family"].map(lambda f: FAMILIES.loc[family_for(f), "panel"]) == panel].iterrows():
                st = style_of(row["family"])
                ax.plot([row["kept"]], [row["score"]], marker=st["marker"], mfc="none", mec=st["color"], ms=6, ls="none")
                ax.annotate(str(row["model"]).split("-Instruct")[0], (row["kept"], row["score"]), xytext=(3, 2),
                            textcoords="offset points", fontsize=5, color=st["color"], annotation_clip=False)
        front = df[df["front"]].sort_values("kept")
        if len(front):
            ax.step(front["kept"], front["score"].clip(upper=top) if top else front["score"], where="post",
                    color="k", lw=0.8, alpha=0.5, label="Pareto front (all families)")
        kept_axis(ax)
        ax.set_xlabel("held kept (log)")
        fit_title(ax, panel)
        legend_outside(ax, below=True, fontsize=6)
    if papers is not None and len(papers):
        axes[0, 0].plot([], [], marker="o", mfc="none", mec="0.3", ls="none", label="paper (its model), hollow")
        legend_outside(axes[0, 0], below=True, fontsize=6)
    axes[0, 0].set_ylabel(textwrap.fill(ylabel, 36))  # no taller than the axes it labels
    if not higher:
        for ax in axes[0]:
            log_y(ax)
            if top is not None:
                ax.set_ylim(low, top)
    if title:
        fig.suptitle(title)
    if fig.get_layout_engine() is None:
        fig.tight_layout()
    declutter(*axes[0])
    return fig


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
    fit_title(ax, title)
    return ax


def lines(df: pd.DataFrame, x: str, y: str, hue: str | None = None, ax=None, marker: str = "o",
          title: str = "", xlabel: str | None = None, ylabel: str | None = None, logy: bool = False,
          reference: float | None = None, reference_label: str = "full", band: tuple[str, str] | None = None,
          reference_band: tuple[float, float] | None = None, colors: dict[str, str] | None = None,
          legend: bool = True):
    """``y`` against ``x``, one line per ``hue`` value (sorted by ``x``); optional horizontal reference.

    ``band=(lo, hi)`` shades the columns ``lo``..``hi`` around each line (an interval or a spread);
    ``reference_band`` shades an interval around the reference line; ``colors`` fixes a colour per hue value
    (e.g. :data:`ORDERS`), so a value keeps its colour in every panel. ``legend`` (default True): a legend where
    no other panel covers it (:func:`legend_clear`); ``False`` for panels whose series another panel's legend
    already names.
    """
    ax = _axes(ax)
    groups = [(None, df)] if hue is None else df.groupby(hue, sort=True)
    for key, part in groups:
        part = part.sort_values(x)
        color = None if colors is None or key is None else colors[str(key)]
        line, = ax.plot(part[x], part[y], marker=marker, color=color, label=None if key is None else str(key))
        if band is not None:
            ax.fill_between(part[x], part[band[0]], part[band[1]], color=line.get_color(), alpha=0.18, lw=0)
    if reference is not None:
        ax.axhline(reference, color="k", ls="--", lw=0.8, label=reference_label)
        if reference_band is not None:
            ax.axhspan(*reference_band, color="k", alpha=0.08, lw=0)
    if logy:
        log_y(ax)
    ax.set_xlabel(xlabel or x)
    ax.set_ylabel(ylabel or y)
    fit_title(ax, title)
    if (hue is not None or reference is not None) and legend:
        legend_clear(ax)
    return ax


def bars(df: pd.DataFrame, x: str, y: str, ax=None, title: str = "", ylabel: str | None = None, rotate: int = 0):
    """One bar per row of ``df``."""
    ax = _axes(ax)
    ax.bar(df[x].astype(str), df[y], color=PALETTE[0])
    ax.set_ylabel(ylabel or y)
    fit_title(ax, title)
    ax.tick_params(axis="x", rotation=rotate)
    return ax


def interval_lines(df: pd.DataFrame, x: str, hue: str, ax=None, title: str = "", xlabel: str | None = None,
                   ylabel: str = "score", band: tuple[float, float, str] | None = None, logx: bool = False,
                   logy: bool = False, line: bool = True, styles: dict[str, dict[str, str]] | None = None,
                   top: float | None = None):
    """``score`` with its 95 % interval (``score_lo``–``score_hi`` as error bars) against ``x``, one series per
    ``hue`` value (sorted by ``x``); ``band = (lo, hi, label)`` shades a reference interval (e.g. the full cache).
    ``styles`` (label → colour and marker, e.g. :func:`series_styles`) fixes each series' look; ``top`` clips the
    axis there, marking the points above it at the edge with their values. Without lines (``line=False``),
    series at nearly the same ``x`` are spread sideways (:func:`dodge`) so their markers do not cover each other."""
    ax = _axes(ax)
    if not line and len(df):
        df = df.assign(**{x: dodge(df[x], df[hue], log=logx)})
    for i, (key, part) in enumerate(df.groupby(hue, sort=False)):
        part = part.sort_values(x)
        style = (styles or {}).get(str(key), {"color": PALETTE[i % len(PALETTE)], "marker": "o"})
        if top is None:
            score = part["score"].to_numpy(float)
            err = [score - part["score_lo"].to_numpy(float), part["score_hi"].to_numpy(float) - score]
            ax.errorbar(part[x].to_numpy(), score, yerr=err, marker=style["marker"], color=style["color"],
                        ls="-" if line else "none", capsize=2, ms=4, label=str(key))
        else:
            _clipped_errorbar(ax, part[x], part["score"], part["score_lo"], part["score_hi"], top, str(key), style)
    if band is not None:
        ax.axhspan(band[0], band[1], color="0.88", zorder=0, lw=0, label=band[2])
    if logx:
        kept_axis(ax)
    if logy:
        log_y(ax)
    if top is not None:
        ax.set_ylim(top=top)
    ax.set_xlabel(xlabel or x)
    ax.set_ylabel(ylabel)
    fit_title(ax, title)
    declutter(ax)
    return ax
