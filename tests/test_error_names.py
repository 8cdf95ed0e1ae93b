"""Errors name a setting the way its reader set it: from Python as `<Class>.<field>` and never as a flag, from the
command line as the flag (`TextDataModule.num_workers` is --data.num_workers) and never as the class. The table
that translates one into the other (cli.FLAG_PREFIXES) is checked against the parser it stands for."""

from __future__ import annotations

import dataclasses
import json
import sys
from unittest import mock

import pytest
import torch
from lightning.pytorch.cli import LightningCLI

import cli
from eval.callback import ZeroShotEvaluation
from moe import get_preset
from moe.config import ModelConfig
from moe.data import Source, TextDataModule
from moe.data.sources import resolve_source
from moe.errors import InputError, TrainingStopped

from .cli_runs import QUICKSTART, ROOT, refused, tiny_run_args


def sources_with_a_zero_weight(workdir) -> list[Source]:
    return [Source(str(workdir / "corpus")), Source(str(workdir / "corpus"), weight=0.0)]


# name -> (what raises it from Python, the flags that give the same value to the CLI, the Python name, the flag)
CASES = {
    "data argument": (lambda w: TextDataModule(num_workers=-1), lambda w: ["--data.num_workers", "-1"],
                      "TextDataModule.num_workers=-1 must be >= 0", "--data.num_workers=-1 must be >= 0"),
    "mixture entry": (lambda w: TextDataModule(sources=sources_with_a_zero_weight(w)),
                      lambda w: ["--data.sources", json.dumps([dataclasses.asdict(s)
                                                               for s in sources_with_a_zero_weight(w)])],
                      "TextDataModule.sources[1].weight=0.0 must be positive",
                      "--data.sources[1].weight=0.0 must be positive"),
    "evaluation setting": (lambda w: ZeroShotEvaluation(tasks=["piqa"], limit=0), lambda w: ["--eval.limit", "0"],
                           "ZeroShotEvaluation.limit=0 must be positive", "--eval.limit=0 must be positive"),
    "evaluation task": (lambda w: ZeroShotEvaluation(tasks=["piqa", "mmlu2"]), lambda w: ["--eval.tasks", "[mmlu2]"],
                        "ZeroShotEvaluation.tasks: unknown task 'mmlu2'", "--eval.tasks: unknown task 'mmlu2'"),
    # ModelConfig's own messages: these name `ModelConfig.<field>` (moe/config.py) for the command line to rewrite.
    "model config": (lambda w: get_preset("tiny-moe", head_dim=7), lambda w: ["--model.config.head_dim", "7"],
                     "ModelConfig.head_dim=7", "--model.config.head_dim=7"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_python_names_the_setting_and_the_command_line_its_flag(workdir, capsys, case):
    build, flags, python_name, flag = CASES[case]
    with pytest.raises(ValueError) as error:
        build(workdir)
    assert python_name in str(error.value) and "--" not in str(error.value)
    class_name = python_name.split(".")[0]
    line = refused(capsys, ["fit", *tiny_run_args(workdir), *flags(workdir)])
    assert line.startswith("error: ") and flag in line and class_name not in line, line


def test_source_alone_names_its_field():
    with pytest.raises(ValueError, match=r"^Source.weight=-1.0 must be positive \(source 'corpus'\)$"):
        resolve_source(Source("corpus", weight=-1.0))


def test_a_config_read_from_init_from_names_the_checkpoint_not_a_flag(workdir, capsys):
    # The model config is the checkpoint's: no flag set head_dim, so none is named; the field and the file are.
    path = workdir / "odd-head-dim.ckpt"
    config = dataclasses.asdict(get_preset("tiny-moe", d_model=64, n_layers=2, max_seq_len=32))
    torch.save({"model_config": {**config, "head_dim": 7}, "state_dict": {}}, path)
    line = refused(capsys, ["fit", *tiny_run_args(workdir), "--model.init_from", str(path)])
    assert line.startswith(f"error: the model config of --model.init_from {path}: head_dim=7 must be even"), line
    assert "--model.config" not in line and "ModelConfig" not in line


@pytest.mark.parametrize("error,printed", [
    (InputError("TextDataModule.seq_len: checkpoint 16, now 8"), "error: --model.config.max_seq_len: checkpoint 16, now 8"),
    (TrainingStopped("at step 3; lower LanguageModel.lr"), "training stopped: at step 3; lower --model.lr"),
])
def test_errors_raised_while_the_run_goes_name_flags(workdir, capsys, error, printed):
    with pytest.raises(SystemExit) as exit_, mock.patch.object(LightningCLI, "_run_subcommand", side_effect=error):
        cli.main(["fit", *tiny_run_args(workdir)])
    if isinstance(error, TrainingStopped):  # sys.exit(message): Python prints it, and the exit status is 1
        assert exit_.value.code == printed
    else:
        assert exit_.value.code == 2 and capsys.readouterr().err.strip().splitlines()[-1] == printed


# ------------------------------------------------------------------------------------------------ the table


@pytest.mark.parametrize("message,printed", [
    ("ModelConfig.n_heads=6 must be divisible by ModelConfig.n_kv_heads=4",
     "--model.config.n_heads=6 must be divisible by --model.config.n_kv_heads=4"),
    ("LanguageModel.warmup_steps=9", "--model.warmup_steps=9"),
    ("Sampling.top_p=2.0", "--model.sampling.top_p=2.0"),
    ("TextDataModule.prompts[1] is empty", "--data.prompts[1] is empty"),
    ("Source.text_field", "--data.sources[*].text_field"),
    ("ZeroShotEvaluation.every_n_steps=0", "--eval.every_n_steps=0"),
    ("CheckpointOnSigterm.dirpath", "--preemption.dirpath"),
    ("ModelParallelStrategy.tensor_parallel_size=3", "--trainer.strategy.init_args.tensor_parallel_size=3"),
    (("global batch size (TextDataModule.batch_size x data-parallel devices: Trainer.devices x Trainer.num_nodes / "
     "tensor-parallel size)"), ("global batch size (--data.batch_size x data-parallel devices: --trainer.devices x "
                              "--trainer.num_nodes / tensor-parallel size)")),
    # A linked setting is no flag: the flag it is linked from, or (computed) the Python name.
    ("TextDataModule.seq_len: checkpoint 16, now 8", "--model.config.max_seq_len: checkpoint 16, now 8"),
    ("ModelConfig.vocab_size=300", "ModelConfig.vocab_size=300"),
    # Not settings: methods, other classes, qualified names and unknown fields are left as they are.
    ("`Trainer.fit` stopped; call Trainer.predict()", "`Trainer.fit` stopped; call Trainer.predict()"),
    ("moe.config.ModelConfig.n_heads, HFModelConfig.n_heads, ModelConfig.n_headz",
     "moe.config.ModelConfig.n_heads, HFModelConfig.n_heads, ModelConfig.n_headz"),
])
def test_settings_are_printed_as_flags(message, printed):
    assert cli.as_flags(message) == printed


def test_settings_read_from_a_checkpoint_keep_their_field_name():
    assert cli.as_flags("ModelConfig.top_k=3 must be between 1 and ModelConfig.n_experts=2; LanguageModel.lr",
                        read_from_checkpoint=(ModelConfig,)) == "top_k=3 must be between 1 and n_experts=2; --model.lr"


@pytest.fixture(scope="module")
def parsed():
    """The command line's configuration, parsed and not instantiated, with a ModelParallelStrategy and sampling
    settings (None until one is given) to configure."""
    with mock.patch.object(sys, "argv", ["cli.py"]), mock.patch.object(cli.MoECLI, "before_instantiate_classes"), \
            mock.patch.object(cli.MoECLI, "instantiate_classes"):
        return cli.build_cli([*QUICKSTART, "--config", str(ROOT / "configs/strategy/fsdp2.yaml"),
                              "--model.sampling.seed", "1"], run=False).config


@pytest.mark.parametrize("cls", list(cli.FLAG_PREFIXES), ids=lambda cls: cls.__name__)
def test_every_setting_of_the_table_is_a_flag(parsed, cls):
    prefix = cli.FLAG_PREFIXES[cls]
    if cls is Source:  # the entries of a list, given as one --data.sources value
        assert prefix == "--data.sources[*]." and isinstance(parsed["data.sources"], list)
        return
    if prefix == "--trainer.callbacks.":  # a callback's settings follow the --trainer.callbacks+= that adds it
        assert "trainer.callbacks" in parsed
        return
    for field in sorted(cli._settings(cls)):
        name = f"{cls.__name__}.{field}"
        if name in cli.LINKED_SETTINGS:
            linked = cli.LINKED_SETTINGS[name]
            assert linked is None or linked.removeprefix("--") in parsed, name
        else:
            assert (prefix + field).removeprefix("--") in parsed, name
