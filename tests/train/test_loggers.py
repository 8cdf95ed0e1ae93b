"""The optional loggers through the real command line (moe/train/loggers.py, configs/logger/): what a TensorBoard and
an offline W&B run write, read back with their own readers, and the one-line refusal when a logger's package is
missing."""

import json
import sys

import pytest

import cli

from ..cli_runs import ROOT, refused, tiny_run_args

LOGGER_CONFIGS = ROOT / "configs" / "logger"


def logger_run_args(workdir, name: str, max_steps: int = 4) -> list[str]:
    """The tiny run with configs/logger/<name>.yaml composed after the experiment's config, writing under workdir."""
    return [*tiny_run_args(workdir), "--config", str(LOGGER_CONFIGS / f"{name}.yaml"),
            "--trainer.logger.init_args.save_dir", str(workdir / "runs"), "--trainer.max_steps", str(max_steps)]


@pytest.mark.parametrize("name, logger_class", [("csv", "CSVLogger"), ("tensorboard", "TensorBoardLogger"),
                                                ("wandb", "WandbLogger")])
def test_a_logger_config_replaces_the_experiments_logger_and_keeps_its_run_name(workdir, name, logger_class):
    parsed = cli.build_cli(logger_run_args(workdir, name), run=False)  # W&B starts no run before fit
    (logger,) = parsed.trainer.loggers
    assert type(logger).__name__ == logger_class
    if name != "wandb":  # W&B's `name` is its project; the run's name is in its settings
        assert logger.name == "quickstart" and logger.root_dir == str(workdir / "runs" / "quickstart")


def test_several_loggers_are_a_list(workdir):
    loggers = [{"class_path": name, "init_args": {"save_dir": str(workdir / "runs")}}
               for name in ("CSVLogger", "TensorBoardLogger")]
    parsed = cli.build_cli([*tiny_run_args(workdir), "--trainer.logger", json.dumps(loggers)], run=False)
    assert [type(logger).__name__ for logger in parsed.trainer.loggers] == ["CSVLogger", "TensorBoardLogger"]


def test_a_tensorboard_run_writes_the_documented_tags(workdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cli.main(["fit", *logger_run_args(workdir, "tensorboard")])
    run = workdir / "runs" / "quickstart" / "version_0"
    events = EventAccumulator(str(run), size_guidance={"images": 0, "histograms": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    for name in ("train/loss", "train/lr", "val/loss", "perf/tokens_per_s", "perf/peak_host_memory_gib",
                 "experts/layer_0/max_over_mean"):
        assert name in tags["scalars"], (name, tags["scalars"])
    assert "perf/peak_memory_gib" not in tags["scalars"]  # a CUDA device's; this run is on the CPU
    assert 0 < events.Scalars("perf/peak_host_memory_gib")[-1].value < 1024
    assert "experts/load" in tags["images"]
    rows = [json.loads(line) for line in (run / "expert_load.jsonl").read_text().splitlines()]
    layers, n_experts = rows[0]["layers"], len(rows[0]["load"][0])
    assert layers == [0, 1] and n_experts == 8  # tiny-moe with --model.config.n_layers 2
    assert {f"experts/layer_{layer}/load" for layer in layers} <= set(tags["histograms"])
    # One image and one histogram per MoE layer at each log step (every 2 steps): global steps 2 and 4, which
    # Lightning logs as 1 and 3, scalars and images alike.
    assert [row["step"] for row in rows] == [2, 4]
    assert [event.step for event in events.Images("experts/load")] == [1, 3]
    assert [event.step for event in events.Scalars("train/loss")] == [1, 3]
    image = events.Images("experts/load")[-1]
    assert (image.height, image.width) == (len(layers) * 8, n_experts * 8)  # 8-pixel cells
    histogram = events.Histograms(f"experts/layer_{layers[1]}/load")[-1].histogram_value
    assert histogram.num == n_experts and histogram.sum == pytest.approx(1.0, abs=1e-5)  # one value per expert
    # The scalars logged with the file's load: the busiest expert over the mean.
    for row_index, layer in enumerate(layers):
        imbalance = {event.step: event.value for event in events.Scalars(f"experts/layer_{layer}/max_over_mean")}
        for row in rows:
            assert imbalance[row["step"] - 1] == pytest.approx(max(row["load"][row_index]) * n_experts, rel=1e-4)


def test_an_offline_wandb_run_writes_its_run_directory(workdir, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(workdir / "runs"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    try:
        cli.main(["fit", *logger_run_args(workdir, "wandb"), "--trainer.logger.init_args.offline", "true"])
    finally:
        wandb.finish()  # the run stays open in the process until then
        wandb.teardown()  # and its record file is complete only once W&B's service process has stopped
    (run,) = (workdir / "runs" / "wandb").glob("offline-run-*")
    (log,) = run.glob("run-*.wandb")
    records = log.read_bytes()  # W&B's own record format: the metric names are stored as text
    for name in (b"train/loss", b"train/lr", b"val/loss", b"perf/peak_host_memory_gib", b"experts/load"):
        assert name in records, name
    assert list((run / "files" / "media" / "images" / "experts").glob("load_*.png"))


@pytest.mark.parametrize("logger, modules, extra", [
    (["--trainer.logger", "WandbLogger"], ["wandb"], "wandb"),
    (["--config", str(LOGGER_CONFIGS / "wandb.yaml")], ["wandb"], "wandb"),
    (["--config", str(LOGGER_CONFIGS / "tensorboard.yaml")], ["tensorboard", "tensorboardX"], "tensorboard"),
    # One of a list.
    (["--trainer.logger", json.dumps(["CSVLogger", "TensorBoardLogger"])], ["tensorboard", "tensorboardX"],
     "tensorboard"),
])
def test_a_logger_whose_package_is_missing_is_refused_in_one_line(workdir, capsys, monkeypatch, logger, modules,
                                                                  extra):
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)  # `import` fails, importlib.util.find_spec finds nothing
    message = refused(capsys, ["fit", *tiny_run_args(workdir), *logger])
    name = "WandbLogger" if extra == "wandb" else "TensorBoardLogger"
    assert message == (f"error: --trainer.logger {name} needs the {modules[0]} package: "
                       f'pip install -e ".[{extra}]" (or pip install {modules[0]})')
