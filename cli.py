"""Command-line entry point (installed as `moe`).

Training and evaluation go through LightningCLI: `fit`, `validate`, `test` and `predict`, configured by YAML files
composed with repeated `--config` (configs/model, configs/data, configs/trainer, configs/experiment) and dotted
overrides such as `--model.lr 1e-3` or `--trainer.max_steps 100`. The model's vocabulary size is linked to the
data module's tokenizer and the data's sequence length to the model's `max_seq_len`, so neither is repeated.

`moe presets` prints every model preset with its total and active parameter counts, computed from the config;
`moe export CKPT DIR` writes a checkpoint as an HF model directory; `moe consolidate SHARDED_DIR FILE` writes a
sharded checkpoint (FSDP, ModelParallel) as one file.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch
from jsonargparse import set_parsing_settings
from lightning.pytorch.cli import LightningCLI

from eval.callback import ZeroShotEvaluation
from moe.config import ModelConfig, format_count
from moe.data import TextDataModule
from moe.errors import InputError, TrainingStopped
from moe.presets import get_preset, preset_names
from moe.train import LanguageModel
from moe.train.checkpoint import consolidate_checkpoint
from moe.train.checkpoint_io import verify_checkpoint
from moe.train.export import export_to_hf
from moe.train.preemption import CheckpointOnSigterm
from moe.train.strategies import check_strategy

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def print_presets() -> None:
    header = f"{'preset':<14} {'layers':>6} {'d_model':>7} {'heads':>7} {'experts':>7} {'total':>8} {'active':>8}"
    print(header)
    print("-" * len(header))
    for name in preset_names():
        c = get_preset(name)
        experts = f"{c.top_k}/{c.n_experts}" if c.is_moe else "-"
        heads = f"{c.n_heads}/{c.n_kv_heads}"
        print(f"{name:<14} {c.n_layers:>6} {c.d_model:>7} {heads:>7} {experts:>7} "
              f"{format_count(c.num_params()):>8} {format_count(c.num_active_params()):>8}")


# ModelConfig documents each field in a docstring under it; this makes those docstrings the --help text.
set_parsing_settings(docstring_parse_attribute_docstrings=True)


def tokenizer_vocab_size(data: TextDataModule) -> int:
    return data.n_vocab


class MoECLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # The tokenizer may be trained by the data module, so its size is known only once the module exists.
        parser.link_arguments("data", "model.config.vocab_size", compute_fn=tokenizer_vocab_size,
                              apply_on="instantiate")
        parser.link_arguments("model.config.max_seq_len", "data.seq_len")
        # Zero-shot evaluation is always registered and off until tasks are given (configs/eval/), so eval
        # settings compose with any experiment's callback list instead of replacing it.
        parser.add_lightning_class_args(ZeroShotEvaluation, "eval")
        # On by default in every run: a preempted job saves and exits instead of losing its progress.
        parser.add_lightning_class_args(CheckpointOnSigterm, "preemption")

    def _parse_ckpt_path(self) -> None:
        subcommand = self.config.get("subcommand")
        if subcommand == "fit":
            # Lightning would replace the model arguments with the checkpoint's. A resumed fit continues the run
            # in the checkpoint, so LanguageModel compares them instead and refuses a changed run by name (and
            # the checkpoint is verified when the Trainer loads it).
            return
        # validate/test/predict: the checkpoint defines the model, so its config files may be left out. Lightning
        # reads it here with torch.load, which checks no checksum and names no file when it fails: verify first.
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and Path(ckpt_path).is_file():
            try:
                verify_checkpoint(ckpt_path)
            except InputError as error:
                self.parser.error(f"--ckpt_path: {error}")
        super()._parse_ckpt_path()

    def before_instantiate_classes(self) -> None:
        # Every ModelConfig field has a default, so a command that names no model parses, and would build the
        # defaults (a LLaMA-7B shape) only to run out of memory: naming the model is required.
        config = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        given = config.model.config.as_dict()
        unset = all(given.get(f.name, f.default) == f.default for f in dataclasses.fields(ModelConfig)
                    if f.default is not dataclasses.MISSING and f.name != "vocab_size")
        if config.model.init_from is None and unset:
            self.parser.error("no model given: add a model config file (--config configs/model/<name>.yaml), "
                              "--model.config.* values or --model.init_from")
        # A GPU-only strategy on a machine without one, named by flag before any data is prepared.
        try:
            check_strategy(config.trainer)
        except InputError as error:
            self.parser.error(str(error))

    def instantiate_classes(self) -> None:
        # Values that parse but do not make sense together (a config field, a data file) are reported like a
        # parsing error, a message and a non-zero exit, rather than as a traceback.
        try:
            super().instantiate_classes()
        except (ValueError, FileNotFoundError) as error:
            # jsonargparse wraps an error raised while computing the vocab_size link in one that prints the whole
            # data module; the cause alone says what is wrong.
            cause = error.__cause__ if isinstance(error.__cause__, (InputError, FileNotFoundError)) else error
            self.parser.error(str(cause))

    def _run_subcommand(self, subcommand: str) -> None:
        # Errors whose message says what to do (bad data, a checkpoint that does not fit, a diverged run) end
        # with that message and a non-zero status; anything else is a bug and keeps its traceback.
        try:
            super()._run_subcommand(subcommand)
        except InputError as error:  # exit status 2, as for a bad flag
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)
        except TrainingStopped as error:
            sys.exit(f"training stopped: {error}")  # exit status 1


def build_cli(argv: list[str] | None = None, run: bool = True) -> MoECLI:
    """The LightningCLI on `argv` (None: the process's command line)."""
    return MoECLI(
        LanguageModel,
        TextDataModule,
        args=argv,
        run=run,
        seed_everything_default=1234,
        # The LLaMA recipe clips the global gradient norm at 1.0; configs may override it.
        trainer_defaults={"gradient_clip_val": 1.0},
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"description": __doc__.split("\n\n", 1)[1]},
    )


def export(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="moe export", description="Write a Lightning checkpoint of this "
                                     "project as an HF model directory (weights, config.json, tokenizer).")
    parser.add_argument("checkpoint", help="a .ckpt written by `fit` (e.g. runs/quickstart/version_0/checkpoints/"
                        "last.ckpt) or a sharded checkpoint directory")
    parser.add_argument("out_dir", help="directory to write; AutoModelForCausalLM/AutoTokenizer load it")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="weight dtype (default: float32)")
    args = parser.parse_args(argv)
    try:
        out = export_to_hf(args.checkpoint, args.out_dir, DTYPES.get(args.dtype))
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    print(f"wrote {out}")


def consolidate(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="moe consolidate", description="Write a sharded checkpoint directory "
                                     "(FSDPStrategy with state_dict_type sharded, ModelParallelStrategy) as one "
                                     ".ckpt file, which resumes under any strategy or world size.")
    parser.add_argument("src", help="sharded checkpoint directory, e.g. runs/x/version_0/checkpoints/last.ckpt/")
    parser.add_argument("dst", help=".ckpt file to write")
    args = parser.parse_args(argv)
    try:
        out = consolidate_checkpoint(args.src, args.dst)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> None:
    # Returns None: the installed `moe` script exits with main()'s return value.
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] == ["presets"]:
        print_presets()
    elif args[:1] == ["export"]:
        export(args[1:])
    elif args[:1] == ["consolidate"]:
        consolidate(args[1:])
    else:
        build_cli(argv)


if __name__ == "__main__":
    main()
