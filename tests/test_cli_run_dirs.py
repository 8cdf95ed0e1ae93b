"""Where command-line runs write and what they show (moe.train.run_paths, moe.train.progress): one run directory
per run, evaluation and prediction inside the checkpoint's run, progress and validation intervals in optimizer
steps, and the flags and warnings that would mislead."""

import csv
import json
import re
import warnings

import torch
import yaml
from jsonargparse import Namespace
from lightning.pytorch.loggers import CSVLogger

import cli
from moe.train.run_paths import place_loggers

from .cli_runs import refused, tiny_run_args

RUN = "runs/quickstart"


def rows(run) -> list[dict]:
    return list(csv.DictReader((run / "metrics.csv").open()))


def steps_of(table: list[dict], metric: str) -> list[int]:
    return [int(r["step"]) for r in table if r.get(metric)]


def keep_every_checkpoint(workdir) -> None:
    """tiny-callbacks.yaml with ModelCheckpoint keeping every checkpoint (every 3 steps), not only the latest."""
    path = workdir / "tiny-callbacks.yaml"
    settings = yaml.safe_load(path.read_text())
    settings["trainer"]["callbacks"][0]["init_args"]["save_top_k"] = -1
    path.write_text(yaml.safe_dump(settings))


def test_a_resumed_fit_continues_in_its_own_folder_and_log(workdir):
    keep_every_checkpoint(workdir)
    cli.main(["fit", *tiny_run_args(workdir)])
    run = workdir / RUN / "version_0"
    first = rows(run)
    assert steps_of(first, "train/loss") == [1, 3, 5]  # logged every 2 optimizer steps, 0-based
    early = next((run / "checkpoints").glob("epoch=0-step=3*.ckpt"))
    # Resumed from step 3: the rows it logged after step 3 are logged again, not kept twice.
    cli.main(["fit", *tiny_run_args(workdir), "--ckpt_path", str(early)])
    assert sorted(p.name for p in (workdir / RUN).iterdir()) == ["version_0"]
    resumed = rows(run)
    assert steps_of(resumed, "train/loss") == [1, 3, 5]
    assert resumed[:2] == first[:2]  # what the first run wrote before the checkpoint is kept as it was
    load_steps = [json.loads(line)["step"] for line in (run / "expert_load.jsonl").read_text().splitlines()]
    assert load_steps == [2, 4, 6]  # expert_load.jsonl too: steps 4 and 6 once, from the resumed run
    assert torch.load(run / "checkpoints/last.ckpt", weights_only=False)["global_step"] == 6


def test_validate_test_predict_write_into_the_checkpoint_run(workdir, capsys):
    cli.main(["fit", *tiny_run_args(workdir)])
    run = workdir / RUN / "version_0"
    ckpt = str(run / "checkpoints/last.ckpt")
    for command in ("validate", "test", "validate", "predict"):
        cli.main([command, *tiny_run_args(workdir), "--ckpt_path", ckpt])
    assert sorted(p.name for p in (workdir / RUN).iterdir()) == ["version_0"]
    assert sorted(p.name for p in (run / "validate").iterdir()) == ["version_0", "version_1"]
    assert steps_of(rows(run / "validate/version_1"), "val/loss") and steps_of(rows(run / "test/version_0"),
                                                                                "test/loss")
    predictions = run / "predict/version_0/predictions.jsonl"
    records = [json.loads(line) for line in predictions.read_text().splitlines()]
    out = capsys.readouterr().out
    assert [r["prompt"] for r in records] == ["def "] and f"----- 'def ' -----\ndef {records[0]['completion']}" in out
    assert f"completions written to {predictions.relative_to(workdir)}" in out
    # A folder the user names is theirs.
    cli.main(["validate", *tiny_run_args(workdir), "--ckpt_path", ckpt, "--trainer.logger.init_args.save_dir",
              str(workdir / "elsewhere")])
    assert (workdir / "elsewhere/quickstart/version_0/metrics.csv").is_file()


def test_an_hf_directory_is_evaluated_under_runs_at_its_own_length(workdir):
    cli.main(["fit", *tiny_run_args(workdir)])
    cli.main(["export", str(workdir / RUN / "version_0/checkpoints/last.ckpt"), str(workdir / "hf")])
    # No model config and no logger: the model, its length (32) and its tokenizer are the directory's.
    cli.main(["validate", "--model.init_from", str(workdir / "hf"), "--data.tokenizer", str(workdir / "hf"),
              "--data.sources", json.dumps([{"path": str(workdir / "corpus")}]), "--data.batch_size", "4",
              "--data.num_workers", "0", "--trainer.accelerator", "cpu", "--trainer.limit_val_batches", "2"])
    run = workdir / "runs/hf/validate/version_0"
    assert steps_of(rows(run), "val/loss")
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["config"]["max_seq_len"] == 32
    assert not (workdir / "lightning_logs").exists()


def test_progress_and_validation_count_optimizer_steps_under_accumulation(workdir, capfd):
    cli.main(["fit", *tiny_run_args(workdir), "--trainer.accumulate_grad_batches", "2",
              "--trainer.val_check_interval", "2", "--trainer.enable_progress_bar", "true"])
    table = rows(workdir / RUN / "version_0")
    # Validation every 2 optimizer steps (at steps 2, 4 and 6; logged at 0-based steps 1, 3 and 5), not every 2
    # micro-batches, which would be every optimizer step.
    assert steps_of(table, "val/loss") == [1, 3, 5]
    bar = capfd.readouterr().out  # Lightning's bars write to stdout
    counts = re.findall(r"train:[^|]*\|[^|]*\| (\d+)/(\S+) \[", bar)  # every state the training bar showed
    assert counts and {total for _, total in counts} == {"6"} and counts[-1][0] == "6"
    assert "tokens=" in bar and "tok/s=" in bar


def test_optimizer_and_lr_scheduler_flags_say_where_the_settings_are(workdir, capsys):
    for flag in ("--optimizer", "--lr_scheduler"):
        message = refused(capsys, ["fit", *tiny_run_args(workdir), flag, "SGD"])
        assert message.startswith(f"error: {flag} is not a flag of this CLI") and "--model.optimizer" in message


def test_a_fit_shows_no_misleading_warning(workdir, capsys):
    keep_every_checkpoint(workdir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli.main(["fit", *tiny_run_args(workdir)])
        run = workdir / RUN / "version_0"
        cli.main(["fit", *tiny_run_args(workdir), "--ckpt_path",
                  str(next((run / "checkpoints").glob("epoch=0-step=3*.ckpt")))])
    messages = [str(w.message) for w in caught]
    out = capsys.readouterr().out
    for misleading in ("not resumable", "dirpath", "litlogger", "deprecated", "exists and is not empty"):
        assert not [m for m in messages if misleading in m], (misleading, messages)
    assert "Total FLOPs: 0" not in out and "model tiny-moe: 2 layers" in out  # our summary, not Lightning's table
    assert "nats better than context-free" in out or "nats worse than context-free" in out
    assert "+" not in out.split("unigram baseline")[1].splitlines()[0].split(":")[-1]


class RenamedCSVLogger(CSVLogger):
    """A user's subclass of Lightning's CSVLogger, as a config's class_path names it."""


def test_a_logger_subclass_writes_into_the_checkpoint_run_as_its_base_class_does(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / RUN / "version_0"
    (run / "checkpoints").mkdir(parents=True)
    for class_path in ("lightning.pytorch.loggers.CSVLogger", "CSVLogger", f"{__name__}.RenamedCSVLogger",
                       "lightning.pytorch.loggers.tensorboard.TensorBoardLogger"):
        logger = Namespace(class_path=class_path, init_args=Namespace(save_dir="runs", name="quickstart"))
        placed = place_loggers(logger, "validate", str(run / "checkpoints/last.ckpt"), None)
        assert (placed.init_args.save_dir, placed.init_args.name) == (f"{RUN}/version_0", "validate"), class_path
    other = Namespace(class_path="lightning.pytorch.loggers.MLFlowLogger", init_args=Namespace(save_dir="mlruns"))
    assert place_loggers(other, "validate", str(run / "checkpoints/last.ckpt"), None).init_args.save_dir == "mlruns"
