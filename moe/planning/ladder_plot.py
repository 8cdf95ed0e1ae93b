"""The ladder's figure, in the style of Kaplan et al. 2020's figure 1: left, every rung's loss curve against the
compute it had spent, its final validation loss marked and the L(C) fit through the finished rungs; right, the
final validation losses against parameters with the L(N) fit, its 95% band, and the held-out target's prediction
beside what it reached. One colour per family. Drawn on a matplotlib Figure with the Agg canvas (no pyplot)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from moe.planning.ladder import FamilyFit, RungState, rung_compute
from moe.planning.ladder_spec import LadderSpec

SIZE = (1400, 560)  # pixels
DPI = 100
COLORS = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]
SIZE_LABELS = {"non_embedding": "non-embedding parameters", "active_non_embedding": "active non-embedding parameters",
               "total": "parameters", "active": "active parameters"}


def smooth(values: np.ndarray, fraction: float = 0.04) -> np.ndarray:
    """A centred moving average of a logged loss curve over `fraction` of its points (its mini-batch noise would
    hide the trend; centred, so the smoothed curve does not lag behind the run)."""
    half = max(1, round(fraction * len(values) / 2))
    sums = np.concatenate([[0.0], np.cumsum(values, dtype=float)])
    index = np.arange(len(values))
    low, high = np.maximum(index - half, 0), np.minimum(index + half + 1, len(values))
    return (sums[high] - sums[low]) / (high - low)


def _curve_compute(spec: LadderSpec, state: RungState, tokens: np.ndarray) -> np.ndarray:
    return rung_compute(spec, state) * tokens / state.rung.tokens


def draw_ladder(spec: LadderSpec, states: dict[str, list[RungState]], fits: dict[str, FamilyFit],
                path: Path) -> Path:
    figure = Figure(figsize=(SIZE[0] / DPI, SIZE[1] / DPI), dpi=DPI)
    FigureCanvasAgg(figure)
    by_compute, by_size = figure.subplots(1, 2)
    for color, (family, family_states) in zip(COLORS * 4, states.items()):
        fit = fits[family]
        finished = [s for s in family_states if s.final_loss is not None]
        for state in family_states:
            if state.curve is not None:
                tokens, losses = state.curve
                keep = tokens > 0
                if keep.any():
                    by_compute.plot(_curve_compute(spec, state, tokens[keep]), smooth(losses[keep]), color=color,
                                    alpha=0.35, linewidth=1)
        for state in finished:
            marker = "*" if state.rung.is_target else "o"
            by_compute.plot(rung_compute(spec, state), state.final_loss, marker, color=color,
                            markersize=12 if marker == "*" else 6)
        rungs = [s for s in finished if not s.rung.is_target]
        if rungs:
            by_size.plot([s.rung.size(spec.fit_size) for s in rungs], [s.final_loss for s in rungs], "o",
                         color=color, label=f"{family} rungs")
        if fit.by_compute is not None:
            computes = [rung_compute(spec, s) for s in family_states]
            grid = np.geomspace(min(computes) / 1.5, max(computes) * 1.5, 100)
            label = f"{family}: L(C) = {fit.by_compute.e:.2f} + {fit.by_compute.a:.3g} / C^{fit.by_compute.alpha:.3f}"
            by_compute.plot(grid, [fit.by_compute.loss(c) for c in grid], "--", color=color, label=label)
        if fit.by_size is not None:
            sizes = [s.rung.size(spec.fit_size) for s in family_states]
            grid = np.geomspace(min(sizes) / 1.3, max(sizes) * 1.3, 100)
            bands = np.array([fit.by_size.interval(n) for n in grid])
            by_size.fill_between(grid, bands[:, 0], bands[:, 1], color=color, alpha=0.12)
            alpha, stderr = fit.by_size.alpha, fit.by_size.alpha_stderr
            by_size.plot(grid, [fit.by_size.loss(n) for n in grid], "--", color=color,
                         label=f"L(N) = {fit.by_size.e:.2f} + {fit.by_size.a:.3g} / N^{alpha:.3f} (alpha ±{stderr:.3f})")
        prediction = fit.prediction(spec)
        if prediction is not None:
            n, center = prediction["params"], prediction["predicted_loss"]
            low, high = prediction["interval_95"]
            by_size.errorbar([n], [center], yerr=[[center - low], [high - center]], fmt="s", color=color,
                             markerfacecolor="white", capsize=5, label=f"{prediction['rung']} predicted (95%)")
            if "actual_loss" in prediction:
                by_size.plot([n], [prediction["actual_loss"]], "*", color=color, markersize=14,
                             label=f"{prediction['rung']} trained")
    by_compute.set(xscale="log", xlabel="training compute C (FLOPs)",
                   ylabel="loss (curves: train, smoothed; points: validation)",
                   title="Loss against compute")
    by_size.set(xscale="log", xlabel=SIZE_LABELS[spec.fit_size], ylabel="final validation loss",
                title="Final loss against model size")
    for axes in (by_compute, by_size):
        axes.grid(True, which="both", alpha=0.3)
        axes.xaxis.set_minor_formatter(NullFormatter())  # 2x10^4, 3x10^4, ... overlap
        if axes.get_legend_handles_labels()[0]:
            axes.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=DPI)
    return path
