"""The command line against input that broke it (issue 13): runs started at once with the same logger name, sampling
flags beside a checkpoint, an empty prompt list, a --ckpt_path that is not a checkpoint, and trainer flags Lightning
refuses with a traceback. Each error is one line on stderr naming the flag or file, with exit status 2."""

import csv
from typing import ClassVar

import pytest
import torch
import torch.distributed.checkpoint as dcp
import yaml
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.accelerators import CUDAAccelerator, MPSAccelerator
from lightning.pytorch.loggers import CSVLogger

import cli
from moe.generate import Sampling, generate
from moe.train.checkpoint import load_lightning_checkpoint
from moe.train.trainer_checks import check_trainer_flags

from .cli_runs import fit_tiny_run, refused, tiny_run_args

RUN = "runs/quickstart"  # the quickstart's CSVLogger: save_dir runs, name quickstart


def without(args: list[str], flag: str) -> list[str]:
    """`args` less `flag` and its value."""
    i = args.index(flag)
    return args[:i] + args[i + 2:]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The last.ckpt of a tiny fit (3 steps; sampling: max_new_tokens 8, the default temperature 0.8)."""
    return fit_tiny_run(tmp_path_factory.mktemp("trained"), "--trainer.max_steps", "3") / "checkpoints/last.ckpt"


# ------------------------------------------------------------------------------------------------ run directories


def test_runs_started_at_once_get_a_directory_each(workdir, monkeypatch):
    """Lightning numbers a run's directory by listing the existing ones: two runs that list before either has
    created its directory both take version_0 and write over each other's config, metrics and checkpoints. Here
    every listing is that stale one (as if both runs had listed at once): each run must still end in its own."""
    monkeypatch.setattr(CSVLogger, "_get_next_version", lambda self: 0)
    steps = (3, 6)  # told apart in their config, metrics and checkpoints (one every 3 steps)
    for max_steps in steps:
        cli.main(["fit", *tiny_run_args(workdir), "--trainer.max_steps", str(max_steps)])
    runs = sorted(p.name for p in (workdir / RUN).iterdir())
    assert runs == ["version_0", "version_1"]
    for version, max_steps in enumerate(steps):
        run = workdir / RUN / f"version_{version}"
        assert yaml.safe_load((run / "config.yaml").read_text())["trainer"]["max_steps"] == max_steps
        rows = list(csv.DictReader((run / "metrics.csv").open()))
        assert len([r for r in rows if r.get("train/loss")]) == max_steps // 2  # logged every 2 steps
        assert torch.load(run / "checkpoints/last.ckpt", weights_only=False)["global_step"] == max_steps
        assert (run / "tokenizer.json").is_file()


def test_every_logger_claims_its_directory_and_loggers_sharing_one_share_the_version(tmp_path, monkeypatch):
    monkeypatch.setattr(CSVLogger, "_get_next_version", lambda self: 0)  # every listing stale, as in a race
    versions = []
    for _ in range(2):
        loggers = [CSVLogger(tmp_path / "a", name="q"), CSVLogger(tmp_path / "b", name="q"),
                   CSVLogger(tmp_path / "a", name="q")]
        trainer = Trainer(logger=loggers, accelerator="cpu", devices=1)
        cli.claim_run_directory(trainer)
        versions.append([logger.version for logger in loggers])
    assert versions == [[0, 0, 0], [1, 1, 1]]


def test_an_explicit_version_is_left_alone(tmp_path):
    for version in (3, "mine"):
        trainer = Trainer(logger=CSVLogger(tmp_path, name="q", version=version), accelerator="cpu", devices=1)
        cli.claim_run_directory(trainer)
        assert trainer.logger.version == version
    assert not (tmp_path / "q").exists()


# ------------------------------------------------------------------------------------------------ sampling


class RecordPredictions(Callback):
    """Keeps what predict_step returned ({"prompt", "completion"}) in `RecordPredictions.seen`."""

    seen: ClassVar[list[dict]] = []

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        RecordPredictions.seen.append(outputs)


def predicted(workdir, ckpt, *extra: str) -> str:
    """The completion of the prompt "def " by `predict` on `ckpt`, with the run's flags (less its sampling flag)."""
    RecordPredictions.seen = []
    args = without(tiny_run_args(workdir), "--model.sampling.max_new_tokens")
    cli.main(["predict", *args, "--ckpt_path", str(ckpt), "--trainer.logger", "false",
              f"--trainer.callbacks+={__name__}.RecordPredictions", *extra])
    (record,) = RecordPredictions.seen
    assert record["prompt"] == "def "
    return record["completion"]


def expected_completion(ckpt, sampling: Sampling) -> str:
    """Oracle: moe.generate on the checkpoint's model and tokenizer, cut at the first end-of-text."""
    model, tokenizer = load_lightning_checkpoint(ckpt)
    eos = tokenizer.token_to_id("<|endoftext|>")
    prompt = torch.tensor([tokenizer.encode("def ", add_special_tokens=False).ids])
    generator = torch.Generator().manual_seed(sampling.seed)
    new = generate(model, prompt, sampling.max_new_tokens, temperature=sampling.temperature, top_k=sampling.top_k,
                   top_p=sampling.top_p, eos_id=eos, generator=generator)[0, prompt.shape[1]:].tolist()
    return tokenizer.decode(new[: new.index(eos)] if eos in new else new, skip_special_tokens=False)


def test_sampling_flags_win_over_the_checkpoint(workdir, trained):
    """The checkpoint's sampling settings fill in only what the command line leaves out: here max_new_tokens (8 in
    the checkpoint, 200 by default), while --model.sampling.temperature 0 makes decoding greedy."""
    in_checkpoint = Sampling(max_new_tokens=8)  # how `trained` was run
    greedy = expected_completion(trained, Sampling(max_new_tokens=8, temperature=0))
    assert greedy != expected_completion(trained, in_checkpoint)  # so the flag shows
    assert greedy != expected_completion(trained, Sampling(max_new_tokens=200, temperature=0))
    assert predicted(workdir, trained, "--model.sampling.temperature", "0") == greedy
    assert predicted(workdir, trained) == expected_completion(trained, in_checkpoint)


@pytest.mark.parametrize("field,value,command", [
    ("temperature", "-1", "predict"),  # beside a checkpoint, whose valid value used to replace it
    ("max_new_tokens", "0", "fit"),
    ("top_k", "0", "predict"),
    ("top_p", "0", "fit"),
    ("top_p", "1.5", "fit"),
])
def test_invalid_sampling_flags_are_refused(workdir, trained, capsys, field, value, command):
    args = [command, *tiny_run_args(workdir), f"--model.sampling.{field}", value]
    if command == "predict":
        args += ["--ckpt_path", str(trained)]
    line = refused(capsys, args)
    assert all(name in line for name in (f"--model.sampling.{field}=",))
    assert not (workdir / "runs").exists()


def test_sampling_edges():
    Sampling(max_new_tokens=1, temperature=0, top_k=1, top_p=1)
    Sampling(top_k=None, top_p=None)
    for field in ("temperature", "top_p"):  # NaN compares false with everything
        with pytest.raises(ValueError, match=f"Sampling.{field}=nan"):
            Sampling(**{field: float("nan")})


# ------------------------------------------------------------------------------------------------ prompts


def test_predict_without_prompts_is_refused(workdir, capsys):
    line = refused(capsys, ["predict", *tiny_run_args(workdir), "--data.prompts", "[]"])
    assert all(name in line for name in ("--data.prompts",))


# ------------------------------------------------------------------------------------------------ --ckpt_path


@pytest.mark.parametrize("command", ["fit", "validate", "test", "predict"])
@pytest.mark.parametrize("what", ["missing file", "plain directory"])
def test_ckpt_path_that_is_no_checkpoint_is_refused(workdir, capsys, command, what):
    path = workdir / ("missing.ckpt" if what == "missing file" else "corpus")  # corpus: 40 text files
    line = refused(capsys, [command, *tiny_run_args(workdir), "--ckpt_path", str(path)])
    assert all(name in line for name in ("--ckpt_path", str(path),))
    assert not (workdir / "runs").exists() and not (workdir / "cache").exists()  # before anything was prepared
    assert len(list((workdir / "corpus").iterdir())) == 40


def test_sharded_checkpoint_directories_and_lightning_keywords_pass(tmp_path):
    sharded = tmp_path / "last.ckpt"
    dcp.save({"state_dict": {"w": torch.zeros(2)}}, checkpoint_id=sharded)  # one process: a single shard
    for path in (sharded, "last", "best"):
        cli.check_ckpt_path(str(path))


# ------------------------------------------------------------------------------------------------ trainer flags


@pytest.fixture
def no_gpu(monkeypatch):
    """This machine without a GPU, whatever it has."""
    monkeypatch.setattr(CUDAAccelerator, "is_available", staticmethod(lambda: False))
    monkeypatch.setattr(MPSAccelerator, "is_available", staticmethod(lambda: False))


@pytest.mark.parametrize("flag,value", [
    ("--trainer.max_steps", "-5"),
    ("--trainer.max_epochs", "-2"),
    ("--trainer.accelerator", "gpu"),
    ("--trainer.accelerator", "cuda"),
    ("--trainer.devices", "0"),
    ("--trainer.devices", "-2"),
])
def test_trainer_flags_lightning_refuses_are_named(workdir, capsys, no_gpu, flag, value):
    line = refused(capsys, ["fit", *tiny_run_args(workdir), flag, value])
    assert all(name in line for name in (f"{flag} {value}",))
    assert not (workdir / "runs").exists() and not (workdir / "cache").exists()


@pytest.mark.parametrize("setting", [{"max_steps": -1}, {"max_steps": 0}, {"max_epochs": -1}, {"max_epochs": None},
                                     {"devices": -1}, {"devices": "auto"}, {"devices": "2"}, {"devices": [0]},
                                     {"accelerator": "cpu"}, {"accelerator": "auto"}])
def test_trainer_flags_lightning_accepts_pass(no_gpu, setting):
    check_trainer_flags(setting)


def test_gpu_flags_pass_on_a_machine_with_one(monkeypatch):
    monkeypatch.setattr(CUDAAccelerator, "is_available", staticmethod(lambda: True))
    for accelerator in ("gpu", "cuda"):
        check_trainer_flags({"accelerator": accelerator})

