"""moe/plot.py and `moe plot`: the figures of a real tiny run's metrics.csv and of synthetic runs (metrics.csv,
expert_load.jsonl): what is drawn (the lines' and heatmaps' data, legends), the PNGs' pixel sizes, that different
data gives a different image, and the one-line errors of the command line."""

import csv
import json
import shutil

import numpy as np
import pytest
from matplotlib.image import imread

import cli
from moe.plot import (
    CURVE_SIZE,
    MAX_LOAD_PANELS,
    MAX_LOAD_TIME_BINS,
    draw_curves,
    draw_expert_load,
    expert_load_size,
    find_run_dir,
    load_panels,
    load_runs,
    plot_runs,
    read_expert_load,
    read_metrics,
    time_bins,
)

from .cli_runs import fit_tiny_run, refused

CURVE_PIXELS = (CURVE_SIZE[1], CURVE_SIZE[0])  # imread's (height, width)
TOKENS_PER_STEP = 128


@pytest.fixture(scope="module")
def fitted_run(tmp_path_factory):
    """The version folder of a tiny MoE fit through the command line (6 steps, logged every 2, validated every 3)."""
    folder = tmp_path_factory.mktemp("fit")
    return fit_tiny_run(folder, "--trainer.logger.init_args.save_dir", str(folder / "runs"))


def write_metrics(folder, scale: float = 1.0, steps: int = 40, tokens: bool = True):
    """A version folder whose metrics.csv is laid out as CSVLogger's: train metrics every 2 steps and validation
    every 10, each on rows of its own with the other columns empty, `step` the 0-based index of the last step."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for step in range(2, steps + 1, 2):
        row = {"step": step - 1, "epoch": 0, "train/loss": scale * (2 + 5 * np.exp(-step / 10)),
               "train/lr": 1e-3 * min(1.0, step / 10), "perf/tokens_per_s": 1000 + step}
        if tokens:
            row["train/tokens_seen"] = step * TOKENS_PER_STEP
        rows.append(row)
        if step % 10 == 0:
            rows.append({"step": step - 1, "epoch": 0, "val/loss": scale * (2.2 + 5 * np.exp(-step / 10))})
    names = ["epoch", "step"] + sorted({name for row in rows for name in row} - {"epoch", "step"})
    with (folder / "metrics.csv").open("w", newline="") as file:
        writer = csv.DictWriter(file, names)
        writer.writeheader()
        writer.writerows(rows)
    return folder


def write_expert_load(folder, layers=(1, 3), n_experts: int = 4, steps: int = 40, seed: int = 0):
    """An expert_load.jsonl of random loads (rows summing to 1); the (T, L, E) array written."""
    rng = np.random.default_rng(seed)
    load = rng.dirichlet(np.ones(n_experts), size=(steps // 2, len(layers)))
    with (folder / "expert_load.jsonl").open("w") as file:
        for t, step in enumerate(range(2, steps + 1, 2)):
            file.write(json.dumps({"step": step, "layers": list(layers), "load": load[t].tolist()}) + "\n")
    return load


def pixels(path):
    return imread(str(path))  # (height, width, RGBA)


def test_a_real_run(fitted_run, tmp_path):
    rows = list(csv.DictReader((fitted_run / "metrics.csv").open()))
    metrics = read_metrics(fitted_run / "metrics.csv")
    for name in ("train/loss", "val/loss", "train/lr", "train/tokens_seen", "perf/tokens_per_s"):
        logged = [(float(r["step"]) + 1, float(r[name])) for r in rows if r.get(name)]
        assert list(zip(*metrics[name])) == logged, name
    # Steps done: validated every 3 of 6 steps; 4 rows of 32 tokens a step.
    np.testing.assert_array_equal(metrics["val/loss"][0], [3, 6])
    np.testing.assert_array_equal(metrics["train/loss"][0], [2, 4, 6])
    np.testing.assert_array_equal(metrics["train/tokens_seen"][1], metrics["train/tokens_seen"][0] * 4 * 32)
    # The MoE run's expert load (moe/train/routing_metrics.py) is at the steps of its logged metrics.
    expert_load = read_expert_load(fitted_run / "expert_load.jsonl")
    np.testing.assert_array_equal(expert_load.steps, metrics["experts/layer_0/max_over_mean"][0])
    assert expert_load.layers == [0, 1] and expert_load.load.shape == (3, 2, 8)

    written = plot_runs([fitted_run], tmp_path / "plots", x="tokens")
    assert [path.name for path in written] == ["loss.png", "lr.png", "throughput.png", "expert_load.png"]
    for path in written[:3]:
        assert pixels(path).shape[:2] == CURVE_PIXELS
    assert pixels(written[3]).shape[:2] == expert_load_size(2)[::-1]


def test_the_command_takes_the_latest_version_and_writes_beside_it(fitted_run, tmp_path, capsys):
    logger_folder = tmp_path / "runs" / "tiny"
    write_metrics(logger_folder / "version_0")
    (logger_folder / "version_1").mkdir()
    shutil.copy(fitted_run / "metrics.csv", logger_folder / "version_1")
    (logger_folder / "version_1" / "hparams.yaml").touch()
    cli.main(["plot", str(logger_folder)])
    printed = capsys.readouterr().out.splitlines()
    plots = logger_folder / "version_1" / "plots"
    assert printed == [f"wrote {plots / name}" for name in ("loss.png", "lr.png", "throughput.png")]
    assert all((plots / name).is_file() for name in ("loss.png", "lr.png", "throughput.png"))


def test_a_step_logged_twice_is_drawn_once(tmp_path):
    """A run resumed into its own folder from the checkpoint of step 20 after logging up to step 40 (rows and
    records appended): the steps after 20 have the resumed run's values."""
    run = write_metrics(tmp_path / "a" / "version_0")
    first_load = write_expert_load(run, seed=0)
    with (run / "metrics.csv").open() as file:
        header, *rows = file.read().splitlines()
    resumed = write_metrics(tmp_path / "resumed", scale=2.0)
    resumed_rows = (resumed / "metrics.csv").read_text().splitlines()[1:]
    later = [row for row in resumed_rows if int(row.split(",")[1]) >= 21]  # step column: index of the last step
    (run / "metrics.csv").write_text("\n".join([header, *rows, *later]) + "\n")
    resumed_load = write_expert_load(resumed, seed=1)
    with (run / "expert_load.jsonl").open("a") as file:
        file.writelines(line + "\n" for line in (resumed / "expert_load.jsonl").read_text().splitlines()[10:])

    steps, losses = read_metrics(run / "metrics.csv")["train/loss"]
    np.testing.assert_array_equal(steps, np.arange(2, 41, 2))
    np.testing.assert_allclose(losses, (steps <= 20) * (2 + 5 * np.exp(-steps / 10)) * 1.0
                               + (steps > 20) * (2 + 5 * np.exp(-steps / 10)) * 2.0)
    expert_load = read_expert_load(run / "expert_load.jsonl")
    np.testing.assert_array_equal(expert_load.steps, np.arange(2, 41, 2))
    np.testing.assert_array_equal(expert_load.load, np.concatenate([first_load[:10], resumed_load[10:]]))


def test_several_runs_on_one_figure(tmp_path):
    a, b = write_metrics(tmp_path / "a" / "version_0"), write_metrics(tmp_path / "b" / "version_0", scale=1.3)
    runs = load_runs([a, b])
    assert [run.label for run in runs] == ["a/version_0", "b/version_0"]
    figure = draw_curves(runs, [("train/loss", "train"), ("val/loss", "val")], "step", "loss", "loss")
    ax = figure.axes[0]
    assert ax.get_legend_handles_labels()[1] == ["a/version_0 train", "a/version_0 val", "b/version_0 train",
                                                 "b/version_0 val"]
    for line, run, name in zip(ax.lines, [runs[0], runs[0], runs[1], runs[1]], ["train/loss", "val/loss"] * 2):
        np.testing.assert_array_equal(line.get_xdata(), run.metrics[name][0])
        np.testing.assert_array_equal(line.get_ydata(), run.metrics[name][1])
    assert ax.lines[0].get_color() == ax.lines[1].get_color() != ax.lines[2].get_color()

    one = plot_runs([a], tmp_path / "one")[0]
    two = plot_runs([a, b], tmp_path / "two")[0]
    other = plot_runs([b], tmp_path / "other", labels=["a/version_0"])[0]  # the same title as `one`
    named = plot_runs([a, b], tmp_path / "named", labels=["small", "large"])[0]
    assert one.name == two.name == other.name == "loss.png"
    for path in (one, two, other, named):
        assert pixels(path).shape[:2] == CURVE_PIXELS
    assert not np.array_equal(pixels(one), pixels(two))
    assert not np.array_equal(pixels(one), pixels(other))
    assert not np.array_equal(pixels(two), pixels(named))


def test_tokens_on_the_x_axis(tmp_path):
    run = write_metrics(tmp_path / "a" / "version_0")
    (loaded,) = load_runs([run])
    ax = draw_curves([loaded], [("train/loss", "train"), ("val/loss", "val")], "tokens", "loss", "loss").axes[0]
    for line, name in zip(ax.lines, ("train/loss", "val/loss")):
        np.testing.assert_allclose(line.get_xdata(), loaded.metrics[name][0] * TOKENS_PER_STEP)
    assert ax.get_xlabel() == "tokens seen"
    by_step = plot_runs([run], tmp_path / "step")[0]
    by_tokens = plot_runs([run], tmp_path / "tokens", x="tokens")[0]
    assert not np.array_equal(pixels(by_step), pixels(by_tokens))

    untimed = write_metrics(tmp_path / "b" / "version_0", tokens=False)
    with pytest.raises(ValueError, match="b/version_0/metrics.csv has no train/tokens_seen"):
        plot_runs([untimed], tmp_path / "out", x="tokens")


def test_expert_load_heatmaps(tmp_path):
    a, b = write_metrics(tmp_path / "a" / "version_0"), write_metrics(tmp_path / "b" / "version_0")
    load_a = write_expert_load(a, seed=0)
    write_expert_load(b, seed=1)
    written = plot_runs([a], tmp_path / "one")
    assert [path.name for path in written] == ["loss.png", "lr.png", "throughput.png", "expert_load.png"]
    width, height = expert_load_size(2)
    assert pixels(written[-1]).shape[:2] == (height, width)

    expert_load = read_expert_load(a / "expert_load.jsonl")
    assert expert_load.layers == [1, 3]
    figure = draw_expert_load(expert_load, "a")
    for ax, row in zip(figure.axes, range(2)):
        assert ax.get_title() == f"layer {[1, 3][row]}"
        mesh = ax.collections[0]
        np.testing.assert_allclose(np.asarray(mesh.get_array()).reshape(4, 20), load_a[:, row, :].T)

    both = plot_runs([a, b], tmp_path / "two")
    heatmaps = [path for path in both if path.name.startswith("expert_load")]
    assert [path.name for path in heatmaps] == ["expert_load_a_version_0.png", "expert_load_b_version_0.png"]
    assert not np.array_equal(pixels(heatmaps[0]), pixels(heatmaps[1]))

    dense = write_metrics(tmp_path / "dense" / "version_0")
    assert not any(path.name.startswith("expert_load") for path in plot_runs([dense], tmp_path / "dense_plots"))


def test_many_layers_and_steps_are_capped(tmp_path):
    run = write_metrics(tmp_path / "a" / "version_0", steps=2000)
    write_expert_load(run, layers=tuple(range(40)), n_experts=8, steps=2000)
    panels = load_panels(40)
    assert len(panels) == MAX_LOAD_PANELS and panels[0] == 0 and panels[-1] == 39
    path = plot_runs([run], tmp_path / "out")[-1]
    width, height = expert_load_size(40)
    assert pixels(path).shape[:2] == (height, width) == (4 * 250 + 40, 4 * 400 + 120)

    expert_load = read_expert_load(run / "expert_load.jsonl")
    edges, load = time_bins(expert_load.steps, expert_load.load)
    assert load.shape == (MAX_LOAD_TIME_BINS, 40, 8) and len(edges) == MAX_LOAD_TIME_BINS + 1
    assert edges[0] == 0 and edges[-1] == 2000 and np.all(np.diff(edges) > 0)
    np.testing.assert_allclose(load.sum(axis=2), 1.0)  # a bin's mean is still a distribution
    # Each bin averages the records of the steps it spans (here 2 steps a record): weighted by its width, the bins
    # average to the records' mean.
    widths = np.diff(edges)[:, None, None]
    np.testing.assert_allclose((load * widths).sum(axis=0) / 2000, expert_load.load.mean(axis=0))


def test_expert_load_file_errors(tmp_path, capsys):
    run = write_metrics(tmp_path / "a" / "version_0")
    write_expert_load(run)
    path = run / "expert_load.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines) + "\n" + lines[-1][:20])  # a record cut short by a stopped run
    assert len(read_expert_load(path).steps) == len(lines)

    path.write_text("\n".join([lines[0], lines[1][:20], *lines[2:]]) + "\n")
    assert refused(capsys, ["plot", str(run)]).startswith(f"error: {path}, line 2: not JSON (")
    record = json.loads(lines[0])
    path.write_text(json.dumps({**record, "load": record["load"][:1]}) + "\n")
    assert "line 1: load has shape (1, 4), expected (2, experts)" in refused(capsys, ["plot", str(run)])
    path.write_text(lines[0] + "\n" + json.dumps({**record, "layers": [0, 1]}) + "\n")
    assert "line 2: layers [0, 1] differ from the first record's [1, 3]" in refused(capsys, ["plot", str(run)])


def test_a_folder_without_metrics_is_one_line(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    message = refused(capsys, ["plot", str(empty)])
    assert message.startswith(f"error: {empty}: no metrics.csv and no version_N folder in it")
    assert refused(capsys, ["plot", str(tmp_path / "absent")]) == f"error: {tmp_path / 'absent'}: no such run directory"

    logger_folder = tmp_path / "runs" / "x"
    write_metrics(logger_folder / "version_0")
    (logger_folder / "version_2").mkdir()  # a run that has not written its metrics yet
    assert refused(capsys, ["plot", str(logger_folder)]) == \
        f"error: {logger_folder / 'version_2'}: no metrics.csv (versions of {logger_folder} with one: version_0)"
    assert find_run_dir(logger_folder / "version_0") == logger_folder / "version_0"

    run = logger_folder / "version_0"
    assert refused(capsys, ["plot", str(run), str(empty)]).startswith(f"error: {empty}: no metrics.csv")
    assert refused(capsys, ["plot", str(run), "--labels", "a", "b"]) == \
        "error: 2 labels for 1 runs: give one label per run, in order"
    again = logger_folder / ".." / "x" / "version_0"
    assert refused(capsys, ["plot", str(run), str(again)]) == f"error: {again} and {run} are the same run ({again})"
