"""Training curves of one or several runs as PNG files: `plot_runs`, behind `moe plot RUN_DIR [RUN_DIR ...]`.

A run directory is a CSVLogger version folder (`runs/<name>/version_<N>/`) holding Lightning's `metrics.csv` (a
`step` column and one column per metric, each filled only on the rows where it was logged) and, from MoE runs,
`expert_load.jsonl` (one object per log step: `{"step", "layers": [MoE block indices], "load": [[share of the
layer's routed assignments per expert] per MoE layer]}`). `runs/<name>/` stands for its latest version.

The x axis counts optimizer steps done, the trainer's `global_step`, which expert_load.jsonl, `max_steps` and
checkpoint names count too: Lightning's `step` column is one less (the 0-based index of the last step), so a run of
`max_steps: 400` validated every 100 steps has its validation losses at 100, ..., 400 here, at 99, ..., 399 in the
file. A step logged twice (a run resumed into its own folder from an earlier checkpoint) is drawn with its last
value: the steps after that checkpoint were trained again.

Figures, each one PNG of a fixed pixel size (the sizes below at DPI): `loss.png` (train/loss and val/loss of every
run, by optimizer step or by tokens seen), `lr.png` (train/lr), `throughput.png` (perf/tokens_per_s), and per run
with an expert_load.jsonl `expert_load.png` (`expert_load_<label>.png` for several runs): per MoE layer a heatmap
of experts over steps. A figure none of the runs has data for is not written.

Drawn on matplotlib Figure objects with the Agg canvas, no pyplot: no global backend or figure state, so a callback
or a notebook may call plot_runs without changing its own matplotlib setup.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter, MaxNLocator

from moe.errors import InputError

DPI = 100
CURVE_SIZE = (800, 500)  # pixels of loss.png, lr.png, throughput.png
LOAD_PANEL_SIZE = (400, 250)  # pixels of one MoE layer's heatmap
LOAD_COLUMNS = 4  # heatmaps to a row
LOAD_COLORBAR, LOAD_TITLE = 120, 40  # pixels beside and above the grid
MAX_LOAD_PANELS = 16  # more MoE layers are shown as this many, evenly spaced from first to last
MAX_LOAD_TIME_BINS = 400  # more log steps are averaged into this many columns (more than the panel has pixels)

X_AXES = ("step", "tokens")
METRICS_FILE, EXPERT_LOAD_FILE = "metrics.csv", "expert_load.jsonl"


@dataclass
class ExpertLoad:
    """An expert_load.jsonl: T log steps, L MoE layers, E experts."""

    steps: np.ndarray  # (T,)
    layers: list[int]  # MoE block index of each row of `load`
    load: np.ndarray  # (T, L, E) share of the layer's routed assignments since the previous record


@dataclass
class Run:
    path: Path  # the version folder
    label: str
    metrics: dict[str, tuple[np.ndarray, np.ndarray]]  # name -> (steps, values) of the rows that logged it
    expert_load: ExpertLoad | None  # None: no expert_load.jsonl (a dense model, an older run)


def find_run_dir(path: str | Path) -> Path:
    """The folder holding `path`'s metrics.csv: `path` itself, or for a logger folder (`runs/<name>/`) its
    highest version_N. FileNotFoundError, naming `path`, when there is none."""
    path = Path(path)
    if (path / METRICS_FILE).is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such run directory")
    versions = sorted((int(m[1]), child) for child in path.iterdir()
                      if child.is_dir() and (m := re.fullmatch(r"version_(\d+)", child.name)))
    if not versions:
        raise FileNotFoundError(f"{path}: no {METRICS_FILE} and no version_N folder in it (a run directory is a "
                                "CSVLogger folder such as runs/quickstart/version_0)")
    latest = versions[-1][1]
    if not (latest / METRICS_FILE).is_file():
        # A run that has not flushed its first metrics yet, or that failed before: which one is meant is the user's
        # call, not ours.
        with_metrics = [child.name for _, child in versions if (child / METRICS_FILE).is_file()]
        raise FileNotFoundError(f"{latest}: no {METRICS_FILE} (versions of {path} with one: "
                                f"{', '.join(with_metrics) or 'none'})")
    return latest


def by_step(points: dict[float, object]) -> tuple[np.ndarray, list]:
    steps = sorted(points)
    return np.array(steps, dtype=float), [points[step] for step in steps]


def read_metrics(path: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each metric of a CSVLogger metrics.csv as (optimizer steps done, values) of the rows where it was logged,
    in step order, the last value of a step logged twice."""
    path = Path(path)
    with path.open(newline="") as file:
        reader = csv.DictReader(file)
        if not reader.fieldnames or "step" not in reader.fieldnames:
            raise InputError(f"{path}: no 'step' column in the header (not a metrics.csv of Lightning's CSVLogger)")
        names = [name for name in reader.fieldnames if name not in ("step", "epoch")]
        points: dict[str, dict[float, float]] = {name: {} for name in names}
        for row in reader:
            try:
                step = float(row["step"]) + 1  # Lightning's index of the last step -> steps done
                for name in names:
                    if row.get(name):
                        points[name][step] = float(row[name])
            except (TypeError, ValueError):
                raise InputError(f"{path}, line {reader.line_num}: a value is not a number") from None
    metrics = {}
    for name, values in points.items():
        if values:
            steps, logged = by_step(values)
            metrics[name] = (steps, np.array(logged))
    return metrics


def read_expert_load(path: str | Path) -> ExpertLoad | None:
    """The records of an expert_load.jsonl in step order (the last of a step written twice), or None when it holds
    none yet."""
    path = Path(path)
    text = path.read_text()
    lines = text.splitlines()
    loads: dict[float, np.ndarray] = {}
    layers, n_experts = None, None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            if number == len(lines) and not text.endswith("\n"):
                break  # the last record of a run that was stopped while writing it
            raise InputError(f"{path}, line {number}: not JSON ({error.msg})") from None
        where = f"{path}, line {number}"
        if not isinstance(record, dict) or not {"step", "layers", "load"} <= record.keys():
            raise InputError(f"{where}: expected an object with keys step, layers and load")
        if layers is None:
            layers = record["layers"]
        if record["layers"] != layers:
            raise InputError(f"{where}: layers {record['layers']} differ from the first record's {layers}")
        try:
            load = np.array(record["load"], dtype=float)
        except (TypeError, ValueError):
            raise InputError(f"{where}: load is not a list of equally long lists of numbers") from None
        if load.ndim != 2 or len(load) != len(layers) or load.shape[1] != (n_experts or load.shape[1]):
            expected = f"({len(layers)}, {n_experts or 'experts'})"
            raise InputError(f"{where}: load has shape {load.shape}, expected {expected}: one row per MoE layer")
        n_experts = load.shape[1]
        try:
            loads[float(record["step"])] = load
        except (TypeError, ValueError):
            raise InputError(f"{where}: step {record['step']!r} is not a number") from None
    if not loads:
        return None
    steps, ordered = by_step(loads)
    return ExpertLoad(steps, list(layers), np.stack(ordered))


def run_labels(paths: list[Path]) -> list[str]:
    """Each run's folder relative to the runs' common parent (one run: `<name>/version_<N>`)."""
    resolved = [p.resolve() for p in paths]
    if len(resolved) == 1:
        p = resolved[0]
        return [f"{p.parent.name}/{p.name}" if p.name.startswith("version_") else p.name]
    common = Path(os.path.commonpath(resolved))
    return [p.relative_to(common).as_posix() for p in resolved]


def load_runs(run_dirs: list[str | Path], labels: list[str] | None = None) -> list[Run]:
    paths = [find_run_dir(p) for p in run_dirs]
    seen: dict[Path, str | Path] = {}
    for given, path in zip(run_dirs, paths):
        if path.resolve() in seen:
            raise ValueError(f"{given} and {seen[path.resolve()]} are the same run ({path})")
        seen[path.resolve()] = given
    if labels is None:
        labels = run_labels(paths)
    elif len(labels) != len(paths):
        raise ValueError(f"{len(labels)} labels for {len(paths)} runs: give one label per run, in order")
    elif len(set(labels)) != len(labels):
        raise ValueError(f"labels {labels} repeat one: each run needs its own")
    runs = []
    for path, label in zip(paths, labels):
        load_file = path / EXPERT_LOAD_FILE
        load = read_expert_load(load_file) if load_file.is_file() else None
        runs.append(Run(path, label, read_metrics(path / METRICS_FILE), load))
    return runs


def plot_runs(run_dirs: list[str | Path], out_dir: str | Path | None = None, x: str = "step",
              labels: list[str] | None = None) -> list[Path]:
    """Draw the figures of the module docstring for `run_dirs` (version folders, or logger folders standing for
    their latest version) into `out_dir` (default: the first run's `plots/`); the paths written, in order.

    x: "step" (optimizer step) or "tokens" (train/tokens_seen) on the curves' x axis. labels: one per run for
    legends and file names (default: each folder relative to the runs' common parent)."""
    if x not in X_AXES:
        raise ValueError(f"x={x!r}: expected one of {', '.join(X_AXES)}")
    if not run_dirs:
        raise ValueError("no run directory given")
    runs = load_runs(list(run_dirs), labels)
    out = Path(out_dir) if out_dir is not None else runs[0].path / "plots"
    if x == "tokens":
        for run in runs:
            if "train/tokens_seen" not in run.metrics:
                raise ValueError(f"{run.path / METRICS_FILE} has no train/tokens_seen to put on the x axis: plot it "
                                 "by step")
    written = []
    curves = [("loss.png", "loss", [("train/loss", "train"), ("val/loss", "val")], "cross-entropy (nats / token)"),
              ("lr.png", "learning rate", [("train/lr", "")], "learning rate"),
              ("throughput.png", "throughput", [("perf/tokens_per_s", "")], "tokens / s (all devices)")]
    for name, title, series, ylabel in curves:
        figure = draw_curves(runs, series, x, title, ylabel)
        if figure is not None:
            written.append(save(figure, out / name))
    loaded = [run for run in runs if run.expert_load is not None]
    for run in loaded:
        name = "expert_load.png" if len(runs) == 1 else f"expert_load_{file_name(run.label)}.png"
        written.append(save(draw_expert_load(run.expert_load, run.label), out / name))
    if not written:
        raise ValueError(f"nothing to plot: no train/loss, val/loss, train/lr, perf/tokens_per_s or {EXPERT_LOAD_FILE} "
                         f"in {', '.join(str(run.path) for run in runs)}")
    return written


def file_name(label: str) -> str:
    return re.sub(r"[^\w.-]+", "_", label).strip("_") or "run"


def save(figure: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure)
    figure.savefig(path, format="png", dpi=DPI)  # the figure's own dpi: an rcParams savefig.dpi would resize it
    return path


def tokens_at(run: Run, steps: np.ndarray) -> np.ndarray:
    """Tokens seen after each of `steps`: train/tokens_seen interpolated between its log steps (a validation step
    is rarely one), from 0 at step 0 and on at the last logged rate past the last log."""
    logged_steps, tokens = run.metrics["train/tokens_seen"]
    logged_steps, tokens = np.concatenate([[0.0], logged_steps]), np.concatenate([[0.0], tokens])
    rate = tokens[-1] / logged_steps[-1] if logged_steps[-1] > 0 else 0.0
    return np.where(steps > logged_steps[-1], tokens[-1] + (steps - logged_steps[-1]) * rate,
                    np.interp(steps, logged_steps, tokens))


def draw_curves(runs: list[Run], series: list[tuple[str, str]], x: str, title: str, ylabel: str) -> Figure | None:
    """One line per run and metric of `series` ((name, legend suffix)); the first series solid, the others dashed
    with markers (validation: few points); a run's series share its colour. None when no run logged any."""
    if not any(name in run.metrics for run in runs for name, _ in series):
        return None
    figure = Figure(figsize=(CURVE_SIZE[0] / DPI, CURVE_SIZE[1] / DPI), dpi=DPI, layout="constrained")
    ax = figure.subplots()
    for i, run in enumerate(runs):
        for j, (name, suffix) in enumerate(series):
            if name not in run.metrics:
                continue
            steps, values = run.metrics[name]
            xs = tokens_at(run, steps) if x == "tokens" else steps
            label = " ".join(part for part in (run.label if len(runs) > 1 else "", suffix) if part) or None
            style = {"linewidth": 1.5} if j == 0 else {"linestyle": "--", "marker": "o", "markersize": 4}
            ax.plot(xs, values, color=f"C{i % 10}", label=label, **style)
    ax.set_title(title if len(runs) > 1 else f"{title}: {runs[0].label}")
    ax.set_xlabel("tokens seen" if x == "tokens" else "optimizer step")
    if x == "tokens":
        ax.xaxis.set_major_formatter(EngFormatter())
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[1]:
        ax.legend(fontsize=8)
    return figure


def load_panels(n_layers: int) -> list[int]:
    """Rows of an ExpertLoad drawn: all, or MAX_LOAD_PANELS evenly spaced from the first to the last."""
    if n_layers <= MAX_LOAD_PANELS:
        return list(range(n_layers))
    return sorted({round(i * (n_layers - 1) / (MAX_LOAD_PANELS - 1)) for i in range(MAX_LOAD_PANELS)})


def expert_load_size(n_layers: int) -> tuple[int, int]:
    """(width, height) in pixels of draw_expert_load's figure for n_layers MoE layers."""
    panels = len(load_panels(n_layers))
    columns = min(panels, LOAD_COLUMNS)
    rows = math.ceil(panels / columns)
    return columns * LOAD_PANEL_SIZE[0] + LOAD_COLORBAR, rows * LOAD_PANEL_SIZE[1] + LOAD_TITLE


def time_bins(steps: np.ndarray, load: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(T'+1 step edges, (T', L, E) load) with T' <= MAX_LOAD_TIME_BINS: each record covers the steps since the
    one before (the first, as long a span as the second), a bin the mean of its records."""
    first_span = steps[1] - steps[0] if len(steps) > 1 else 1.0
    edges = np.concatenate([[max(steps[0] - first_span, 0.0)], steps])
    if len(steps) <= MAX_LOAD_TIME_BINS:
        return edges, load
    groups = np.array_split(np.arange(len(steps)), MAX_LOAD_TIME_BINS)
    return (np.array([edges[g[0]] for g in groups] + [edges[-1]]),
            np.stack([load[g].mean(axis=0) for g in groups]))


def draw_expert_load(expert_load: ExpertLoad, label: str) -> Figure:
    """Per MoE layer (at most MAX_LOAD_PANELS), a heatmap of each expert's share of the layer's routed
    assignments over steps, on one colour scale for all layers; balance is 1/E everywhere."""
    rows_drawn = load_panels(len(expert_load.layers))
    width, height = expert_load_size(len(expert_load.layers))
    figure = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, layout="constrained")
    columns = min(len(rows_drawn), LOAD_COLUMNS)
    # Not shared axes: those would hide the step labels of a panel above an empty cell of the last row.
    axes = figure.subplots(math.ceil(len(rows_drawn) / columns), columns, squeeze=False)
    for ax in axes.flat[len(rows_drawn):]:
        ax.set_axis_off()
    edges, load = time_bins(expert_load.steps, expert_load.load)
    n_experts = load.shape[2]
    vmax = float(load.max()) or 1.0
    for ax, row in zip(axes.flat, rows_drawn):
        mesh = ax.pcolormesh(edges, np.arange(n_experts + 1) - 0.5, load[:, row, :].T, vmin=0.0, vmax=vmax,
                             cmap="viridis", shading="flat")
        ax.set_title(f"layer {expert_load.layers[row]}", fontsize=9)
        ax.yaxis.set_major_locator(MaxNLocator(nbins=min(n_experts, 8), integer=True))
        ax.tick_params(labelsize=7)
    for ax in axes.flat[max(len(rows_drawn) - columns, 0):len(rows_drawn)]:  # the lowest panel of each column
        ax.set_xlabel("optimizer step", fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel("expert", fontsize=8)
    shown = "" if len(rows_drawn) == len(expert_load.layers) else \
        f" ({len(rows_drawn)} of {len(expert_load.layers)} MoE layers)"
    figure.suptitle(f"expert load: {label}{shown}", fontsize=10)
    # The label fits the height of one row of panels; the white line marks balance.
    colorbar = figure.colorbar(mesh, ax=axes.ravel().tolist(), label=f"share of assignments (white: 1/{n_experts})")
    colorbar.ax.axhline(1 / n_experts, color="white", linewidth=1.5)
    return figure
