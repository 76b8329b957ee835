"""PNG plots of benchmark results (matplotlib, imported lazily; no pyplot, no global state).

Each function draws on its own ``matplotlib.figure.Figure`` with an Agg canvas, so importing
this module does not import matplotlib, and plotting neither needs a display nor changes
matplotlib's global backend. Every function creates missing parent folders of ``path`` and
returns the written path.

``mode`` keys name the system configurations being compared (e.g. ``"hybrid"``, ``"rapid"``);
each mode keeps one colour across a figure.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rapid.bench.metrics import percentile_key

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["plot_attainment", "plot_latency_percentiles", "plot_frontier"]

_DPI = 150
_LINESTYLES = ("-", "--", ":", "-.")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X")


def _new_figure(figsize: tuple[float, float] = (6.4, 4.4)) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=_DPI)
    return path


def _mode_colors(modes: Sequence[str]) -> dict[str, Any]:
    from matplotlib import rcParams

    cycle = rcParams["axes.prop_cycle"].by_key().get("color", ["C0"])
    return {mode: cycle[i % len(cycle)] for i, mode in enumerate(modes)}


def _mark_unstable(ax, points: Mapping[str, Sequence[tuple[float, float]]] | None) -> None:
    """A red cross on each (rate, value) measured at an unstable rate (its queue kept growing)."""
    pts = [p for ps in (points or {}).values() for p in ps]
    if pts:
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker="x", s=80, color="red", zorder=5,
                   label="unstable (queue grows)")


def _plot_modes(ax, series: Mapping[str, Sequence[tuple]]) -> dict[str, Any]:
    """One marked line per mode through its (x, y, ...) points in order of (x, y); returns the mode colours."""
    colors = _mode_colors(list(series))
    for i, (mode, points) in enumerate(series.items()):
        pts = sorted(points, key=lambda p: (p[0], p[1]))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=_MARKERS[i % len(_MARKERS)], color=colors[mode],
                label=mode)
    return colors


def plot_attainment(
    results: Mapping[str, Sequence[tuple[float, float]]],
    path: str | Path,
    title: str = "SLO attainment vs request rate",
    *,
    target: float | None = 0.9,
    xlabel: str = "Request rate (req/s)",
    unstable: Mapping[str, Sequence[float]] | None = None,
) -> Path:
    """SLO attainment (0..1, shown in %) against request rate, one line per mode.

    Args:
        results: ``{mode: [(rate, attainment), ...]}``; points are sorted by rate.
        path: Output PNG path.
        title: Figure title.
        target: Attainment target drawn as a dashed horizontal line (``None``: no line).
        xlabel: X-axis label (e.g. "Request rate per GPU (req/s)").
        unstable: ``{mode: [rate, ...]}`` measured at an unstable rate: marked with a red cross.
    """
    from matplotlib.ticker import PercentFormatter

    fig = _new_figure()
    ax = fig.add_subplot()
    _plot_modes(ax, results)
    _mark_unstable(ax, {m: [(r, a) for r, a in results.get(m, []) if r in set(rs)]
                        for m, rs in (unstable or {}).items()})
    if target is not None:
        ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target:.0%}")
    ax.set_ylim(0, 1.05)
    ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("SLO attainment")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_latency_percentiles(
    results: Mapping[str, Sequence[tuple[float, Mapping[str, float]]]],
    path: str | Path,
    metric: str = "ttft",
    percentiles: Sequence[float] = (50, 90, 99),
    title: str | None = None,
    *,
    slo_ms: float | None = None,
    xlabel: str = "Request rate (req/s)",
    log_y: bool = False,
    unstable: Mapping[str, Sequence[float]] | None = None,
) -> Path:
    """Latency percentiles of one metric against request rate, per mode.

    Args:
        results: ``{mode: [(rate, metrics), ...]}`` where ``metrics`` is a dict returned by
            :func:`rapid.bench.metrics.compute_metrics` for the run at that rate (it must hold
            ``p<P>_<metric>_ms`` for every requested percentile).
        path: Output PNG path.
        metric: ``"ttft"``, ``"tpot"``, ``"itl"`` or ``"e2el"``.
        percentiles: Percentiles to draw; colour = mode, line style = percentile.
        title: Figure title (default: "<METRIC> percentiles vs request rate").
        slo_ms: The metric's SLO drawn as a dashed horizontal line (``None``: no line).
        xlabel: X-axis label.
        log_y: Log-scale latency axis (useful once queues build up).
        unstable: ``{mode: [rate, ...]}`` measured at an unstable rate: each percentile there gets a red cross.

    Raises:
        KeyError: a metrics dict lacks a requested percentile.
    """
    fig = _new_figure()
    ax = fig.add_subplot()
    colors = _mode_colors(list(results))
    for mode, runs in results.items():
        runs = sorted(runs, key=lambda run: run[0])
        for j, p in enumerate(percentiles):
            key = percentile_key(metric, p)
            missing = [rate for rate, m in runs if key not in m]
            if missing:
                raise KeyError(f"{mode}: no {key!r} in the metrics at rate(s) {missing}")
            ax.plot(
                [rate for rate, _ in runs],
                [m[key] for _, m in runs],
                color=colors[mode],
                linestyle=_LINESTYLES[j % len(_LINESTYLES)],
                marker=".",
                label=f"{mode} p{p:g}",
            )
    _mark_unstable(ax, {m: [(r, met[percentile_key(metric, p)]) for r, met in results.get(m, []) if r in set(rs)
                            for p in percentiles] for m, rs in (unstable or {}).items()})
    if slo_ms is not None:
        ax.axhline(slo_ms, color="grey", linestyle="--", linewidth=1, label=f"SLO {slo_ms:g} ms")
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"{metric.upper()} (ms)")
    ax.set_title(title if title is not None else f"{metric.upper()} percentiles vs request rate")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)


def plot_frontier(
    points: Mapping[str, Sequence[tuple[float, float, str]]],
    path: str | Path,
    title: str = "Decode latency vs prefill throughput",
    *,
    tpot_slo_ms: float | None = None,
) -> Path:
    """Trade-off frontier: TPOT (ms, x) against prefill throughput (tokens/s, y).

    All modes (e.g. hybrid batching and RAPID's concurrent prefill/decode) share the same
    axes; each mode's points are joined in order of TPOT and annotated with their label (e.g.
    the chunk size or the SM split that produced them). Up and to the left is better.

    Args:
        points: ``{mode: [(tpot_ms, prefill_tok_s, label), ...]}``.
        path: Output PNG path.
        title: Figure title.
        tpot_slo_ms: A TPOT SLO drawn as a dashed vertical line (``None``: no line).
    """
    fig = _new_figure()
    ax = fig.add_subplot()
    colors = _plot_modes(ax, points)
    for mode, pts in points.items():
        for tpot, tok_s, label in pts:
            if label:
                ax.annotate(
                    str(label),
                    (tpot, tok_s),
                    textcoords="offset points",
                    xytext=(4, 4),
                    fontsize="x-small",
                    color=colors[mode],
                )
    if tpot_slo_ms is not None:
        ax.axvline(
            tpot_slo_ms,
            color="grey",
            linestyle="--",
            linewidth=1,
            label=f"TPOT SLO {tpot_slo_ms:g} ms",
        )
    ax.set_xlabel("TPOT (ms)")
    ax.set_ylabel("Prefill throughput (tokens/s)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    return _save(fig, path)
