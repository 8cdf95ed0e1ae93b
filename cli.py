"""Command-line entry point (installed as `moe`).

Training and evaluation go through LightningCLI: `fit`, `validate`, `test` and `predict`, configured by YAML files
composed with repeated `--config` (configs/model, configs/data, configs/trainer, configs/experiment) and dotted
overrides such as `--model.lr 1e-3` or `--trainer.max_steps 100`. The model's vocabulary size is linked to the
data module's tokenizer and the data's sequence length to the model's `max_seq_len`, so neither is repeated.

`moe presets` prints every model preset with its total and active parameter counts, computed from the config;
`moe export CKPT DIR` writes a checkpoint as an HF model directory; `moe consolidate SHARDED_DIR FILE` writes a
sharded checkpoint (FSDP, ModelParallel) as one file; `moe plot RUN_DIR...` draws the loss, learning-rate,
throughput and expert-load figures of one or several runs (moe/plot.py); `moe plan MODEL --tokens N | --flops C`
prints parameters, FLOPs, compute-optimal allocations, memory per strategy and time; `moe ladder LADDER.yaml` trains
a ladder of model sizes and fits and predicts from their losses (moe/planning/).
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import sys
from pathlib import Path

from jsonargparse import Namespace, set_parsing_settings
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelSummary, ProgressBar
from lightning.pytorch.cli import LightningCLI

from eval.callback import ZeroShotEvaluation
from moe import commands
from moe.config import ModelConfig, format_count, runtime_fields
from moe.data import TextDataModule
from moe.data.sources import Source
from moe.errors import ConfigError, InputError, TrainingStopped
from moe.generate import Sampling
from moe.presets import get_preset, preset_names
from moe.train import LanguageModel
from moe.train.checkpoint import init_config
from moe.train.checkpoint_verify import verify_checkpoint
from moe.train.guard import StepGuard
from moe.train.preemption import CheckpointOnSigterm
from moe.train.quiet import silence_misleading_messages
from moe.train.run_paths import check_ckpt_path, claim_run_directory, place_loggers
from moe.train.strategies import ModelParallelStrategy, check_parallel_sizes, check_strategy, resolve_class
from moe.train.throughput import ThroughputMonitor
from moe.train.trainer_checks import check_trainer_flags


def print_presets() -> None:
    width = max(14, *(len(name) for name in preset_names()))
    header = f"{'preset':<{width}} {'layers':>6} {'d_model':>7} {'heads':>7} {'experts':>7} {'total':>8} {'active':>8}"
    print(header)
    print("-" * len(header))
    for name in preset_names():
        c = get_preset(name)
        experts = f"{c.top_k}/{c.n_experts}" if c.is_moe else "-"
        heads = f"{c.n_heads}/{c.n_kv_heads}"
        print(f"{name:<{width}} {c.n_layers:>6} {c.d_model:>7} {heads:>7} {experts:>7} "
              f"{format_count(c.num_params()):>8} {format_count(c.num_active_params()):>8}")


# ModelConfig documents each field in a docstring under it; this makes those docstrings the --help text.
set_parsing_settings(docstring_parse_attribute_docstrings=True)


def tokenizer_vocab_size(data: TextDataModule) -> int:
    return data.n_vocab


# ---- Python settings as flags -----------------------------------------------------------------------------------
# Library errors name a setting as Python spells it, `<Class>.<field>` (`TextDataModule.num_workers=-1 must be
# >= 0`), so that a Python user reads what they set; the command line prints each as the flag that sets it
# (`--data.num_workers=-1 must be >= 0`). One row per class this CLI configures: its flag prefix.
FLAG_PREFIXES: dict[type, str] = {
    ModelConfig: "--model.config.",
    LanguageModel: "--model.",
    Sampling: "--model.sampling.",
    TextDataModule: "--data.",
    # An entry of the data mixture. The data module names its index (`TextDataModule.sources[1].weight` is
    # --data.sources[1].weight); a Source alone does not know it, and its message names the source by its path.
    Source: "--data.sources[*].",
    ZeroShotEvaluation: "--eval.",
    CheckpointOnSigterm: "--preemption.",
    # Lightning's, whose arguments the project's subclass (moe.train.strategies, configs/strategy/fsdp2.yaml) takes.
    ModelParallelStrategy: "--trainer.strategy.init_args.",
    Trainer: "--trainer.",
    # Callbacks given in trainer.callbacks, set as `--trainer.callbacks+=moe.train.guard.StepGuard
    # --trainer.callbacks.<field> VALUE` (the flag sets the last callback added).
    StepGuard: "--trainer.callbacks.",
    ThroughputMonitor: "--trainer.callbacks.",
}
# Settings this CLI fills in by a link (add_arguments_to_parser), which cannot be given as flags: the flag the
# value comes from, or None where it is computed (the vocabulary size, from the data's tokenizer), which keeps the
# Python name.
LINKED_SETTINGS: dict[str, str | None] = {
    "TextDataModule.seq_len": "--model.config.max_seq_len",
    "ModelConfig.vocab_size": None,
}
_CLASSES = {cls.__name__: cls for cls in FLAG_PREFIXES}
# A class name on its own (not the tail of a dotted path such as moe.config.ModelConfig), a dot, a field name.
_SETTING = re.compile(rf"(?<![\w.])({'|'.join(_CLASSES)})\.([A-Za-z_]\w*)")


def _settings(cls: type) -> set[str]:
    """The names a class takes as configuration: a dataclass's fields, otherwise its constructor's parameters."""
    if dataclasses.is_dataclass(cls):
        return {field.name for field in dataclasses.fields(cls)}
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    # A subclass passing its parent's settings through **kwargs (our ModelParallelStrategy) takes those too.
    names: set[str] = set()
    for base in cls.__mro__:
        if "__init__" not in vars(base):
            continue
        parameters = inspect.signature(base.__init__).parameters.values()
        names |= {p.name for p in parameters if p.kind in kinds and p.name != "self"}
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
            break
    return names


def as_flags(message: str, read_from_checkpoint: tuple[type, ...] = ()) -> str:
    """`message` with each `<Class>.<field>` of a class in FLAG_PREFIXES written as its flag.

    Only settings are rewritten: a method (`Trainer.fit`, in Lightning's messages) keeps its name. The fields of
    the classes in `read_from_checkpoint` were read from a checkpoint, not given as flags, so they are written as
    the bare field name."""
    def flag(match: re.Match) -> str:
        name, field = match.groups()
        cls = _CLASSES[name]
        if field not in _settings(cls):
            return match[0]
        if cls in read_from_checkpoint:
            return field
        if match[0] in LINKED_SETTINGS:
            return LINKED_SETTINGS[match[0]] or match[0]
        return FLAG_PREFIXES[cls] + field

    return _SETTING.sub(flag, message)


def refuse(message: str, flags: bool = True) -> None:
    """End the command with one line on stderr and exit status 2, as for a bad flag (and no usage text).

    With `flags`, the settings the message names (`TextDataModule.seq_len`) are written as this CLI's flags;
    commands whose settings are not flags (`moe export`) pass False."""
    print(f"error: {as_flags(message) if flags else message}", file=sys.stderr)
    sys.exit(2)


def add_callback_unless_given(trainer: Namespace, switch: str, kind: type, class_path: str) -> None:
    """Append `class_path` to trainer.callbacks unless the Trainer flag `switch` is false or a callback of type
    `kind` is given (Lightning would add its own of that kind otherwise)."""
    callbacks = trainer.get("callbacks") or []
    if trainer.get(switch) is False or any(issubclass(_callback_class(c), kind) for c in callbacks):
        return
    trainer.callbacks = [*callbacks, Namespace(class_path=class_path, init_args=Namespace())]


def _callback_class(callback) -> type:
    """The class of a trainer.callbacks entry: a class_path Namespace or an instance."""
    if isinstance(callback, Namespace):
        return resolve_class(callback.get("class_path", "")) or object
    return type(callback)


class MoECLI(LightningCLI):
    def parse_arguments(self, parser, args) -> None:
        self._args = args  # parsed again, without defaults, to tell the settings given from the defaults
        super().parse_arguments(parser, args)

    def add_arguments_to_parser(self, parser) -> None:
        # The tokenizer may be trained by the data module, so its size is known only once the module exists. (A
        # linked setting is no flag: LINKED_SETTINGS says how an error names these two.)
        parser.link_arguments("data", "model.config.vocab_size", compute_fn=tokenizer_vocab_size,
                              apply_on="instantiate")
        parser.link_arguments("model.config.max_seq_len", "data.seq_len")
        # Zero-shot evaluation is always registered and off until tasks are given (configs/eval/), so eval
        # settings compose with any experiment's callback list instead of replacing it.
        parser.add_lightning_class_args(ZeroShotEvaluation, "eval")
        # On by default in every run: a preempted job saves and exits instead of losing its progress.
        parser.add_lightning_class_args(CheckpointOnSigterm, "preemption")

    def _given(self, key: str) -> Namespace:
        """The settings under `key` (e.g. "model.config") given on the command line or in config files, without
        the defaults."""
        if not hasattr(self, "_given_settings"):
            args = self._args
            self._given_settings = self.parser.parse_object(args, defaults=False) \
                if isinstance(args, (dict, Namespace)) else self.parser.parse_args(args, defaults=False)
        subcommand = self.config.get("subcommand")
        found = self._given_settings.get(f"{subcommand}.{key}" if subcommand else key)
        return found if isinstance(found, Namespace) else Namespace()

    def _flag_given(self, flag: str) -> bool:
        """Whether the command line holds `flag` (as `--flag value` or `--flag=value`)."""
        args = self._args
        if isinstance(args, (dict, Namespace)):
            return Namespace(args).get(f"{self.config.get('subcommand')}.{flag.removeprefix('--')}") is not None
        return any(arg == flag or arg.startswith(f"{flag}=") for arg in args or sys.argv[1:])

    def _parse_ckpt_path(self) -> None:
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path:
            try:
                check_ckpt_path(str(ckpt_path))
            except InputError as error:
                refuse(str(error))
        if subcommand == "fit":
            # Lightning would replace the model arguments with the checkpoint's. A resumed fit continues the run
            # in the checkpoint, so LanguageModel compares them instead and refuses a changed run by name (and
            # the checkpoint is verified when the Trainer loads it).
            return
        # validate/test/predict: the checkpoint defines the model, so its config files may be left out. Lightning
        # reads it here with torch.load, which checks no checksum and names no file when it fails: verify first.
        if not (ckpt_path and Path(ckpt_path).is_file()):
            super()._parse_ckpt_path()  # nothing to read (a sharded directory's hyperparameters are not read)
            return
        try:
            verify_checkpoint(ckpt_path)
        except InputError as error:
            refuse(f"--ckpt_path: {error}")
        # The sampling settings are how to generate, not what the model is: those given (flags, config files)
        # win over the checkpoint's, which fill in the rest.
        given_sampling = self._given("model.sampling")
        super()._parse_ckpt_path()
        sampling = self.config[subcommand].model.get("sampling")
        if isinstance(sampling, Namespace):
            for name, value in given_sampling.items():
                sampling[name] = value

    def before_instantiate_classes(self) -> None:
        # Every ModelConfig field has a default, so a command that names no model parses, and would build the
        # defaults (a LLaMA-7B shape) only to run out of memory: naming the model is required.
        config = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        given = config.model.config.as_dict()
        unset = all(given.get(f.name, f.default) == f.default for f in dataclasses.fields(ModelConfig)
                    if f.default is not dataclasses.MISSING and f.name != "vocab_size")
        if config.model.init_from is None and unset:
            refuse("no model given: add a model config file (--config configs/model/<name>.yaml), "
                   "--model.config.* values or --model.init_from")
        # A GPU-only strategy, an absent accelerator or an impossible limit, named by flag before any data is
        # prepared (Lightning's errors come from inside the Trainer's constructor, as tracebacks).
        try:
            check_strategy(config.trainer)
            check_parallel_sizes(config.trainer, None if config.model.init_from else config.model.config)
            check_trainer_flags(config.trainer)
            # A logger whose package is missing (TensorBoard, W&B) fails only once built, as a traceback.
            from moe.train.loggers import check_logger_packages
            check_logger_packages(config.trainer.get("logger"))
        except InputError as error:
            refuse(str(error))
        # Checked here rather than when jsonargparse builds it, which buries the message in one about its union type.
        sampling = config.model.get("sampling")
        if isinstance(sampling, Namespace):
            try:
                Sampling(**sampling.as_dict())
            except ValueError as error:
                refuse(str(error))
        # Where this command writes: a resumed fit in its own run folder, validate/test/predict on a checkpoint in
        # a subfolder of its run, and CSV under runs/ when no logger is given (moe.train.run_paths).
        config.trainer.logger = place_loggers(config.trainer.logger, self.subcommand or "fit", config.get("ckpt_path"),
                                              config.model.init_from)
        init_from = config.model.init_from
        if init_from and Path(init_from).expanduser().is_dir() and not self._flag_given("--model.config.max_seq_len"):
            # An HF model is read (and evaluated) in windows of its own maximum length unless the flag says
            # otherwise (a model config file's length is not the HF model's); the link gave the data the default.
            try:
                length = init_config(ModelConfig(), init_from).max_seq_len
            except (ValueError, FileNotFoundError) as error:
                refuse(str(error))
            config.model.config.max_seq_len = config.data.seq_len = length
        # Training progress in optimizer steps and a one-line model summary, unless given (or turned off).
        add_callback_unless_given(config.trainer, "enable_progress_bar", ProgressBar,
                                  "moe.train.progress.StepProgressBar")
        add_callback_unless_given(config.trainer, "enable_model_summary", ModelSummary,
                                  "moe.train.summary.ModelOverview")
        if self.subcommand == "predict" and not config.data.prompts:
            refuse("--data.prompts is empty: predict continues each prompt, so give at least one, e.g. "
                   "--data.prompts '[\"def \"]'")

    def instantiate_classes(self) -> None:
        # Values that parse but do not make sense together (a config field, a data file) are reported like a
        # parsing error, a message and a non-zero exit, rather than as a traceback.
        try:
            super().instantiate_classes()
        except (ValueError, FileNotFoundError) as error:
            # jsonargparse wraps an error raised while computing the vocab_size link in one that prints the whole
            # data module; the cause alone says what is wrong.
            cause = error.__cause__ if isinstance(error.__cause__, (InputError, FileNotFoundError)) else error
            config = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
            init_from = config.model.get("init_from")
            if init_from and isinstance(cause, ConfigError) and cause.field not in runtime_fields():
                # The model config is the checkpoint's but for the runtime fields: no flag set the field at fault.
                refuse(f"the model config of --model.init_from {init_from}: "
                       + as_flags(str(cause), read_from_checkpoint=(ModelConfig,)))
            refuse(str(cause))  # the settings it names, as flags

    def _run_subcommand(self, subcommand: str) -> None:
        # Errors whose message says what to do (bad data, a checkpoint that does not fit, a diverged run) end
        # with that message and a non-zero status; anything else is a bug and keeps its traceback.
        # Before Lightning resolves the run's directory (profiler, SaveConfigCallback, ModelCheckpoint).
        claim_run_directory(self.trainer)
        try:
            super()._run_subcommand(subcommand)
        except InputError as error:  # exit status 2, as for a bad flag
            refuse(str(error))
        except TrainingStopped as error:
            sys.exit(f"training stopped: {as_flags(str(error))}")  # exit status 1


def build_cli(argv: list[str] | None = None, run: bool = True) -> MoECLI:
    """The LightningCLI on `argv` (None: the process's command line)."""
    silence_misleading_messages()
    return MoECLI(
        LanguageModel,
        TextDataModule,
        args=argv,
        run=run,
        seed_everything_default=1234,
        # The LLaMA recipe clips the global gradient norm at 1.0; configs may override it.
        trainer_defaults={"gradient_clip_val": 1.0},
        save_config_kwargs={"overwrite": True},
        # LightningCLI's --optimizer/--lr_scheduler would replace configure_optimizers, dropping the decay groups and
        # the schedule; the optimizer is LanguageModel's (--model.optimizer, --model.optimizer_args).
        auto_configure_optimizers=False,
        parser_kwargs={"description": __doc__.split("\n\n", 1)[1]},
    )


def main(argv: list[str] | None = None) -> None:
    # Returns None: the installed `moe` script exits with main()'s return value.
    args = sys.argv[1:] if argv is None else list(argv)
    for flag in ("--optimizer", "--lr_scheduler"):
        if any(arg == flag or arg.startswith((f"{flag}=", f"{flag}.")) for arg in args):
            refuse(f"{flag} is not a flag of this CLI: the optimizer and its schedule are the model's "
                   "(--model.optimizer SGD --model.optimizer_args '{momentum: 0.9}', --model.lr, "
                   "--model.schedule cosine|wsd|constant, --model.warmup_steps)", flags=False)
    if args[:1] == ["presets"]:
        print_presets()
    elif args[:1] and args[0] in commands.COMMANDS:
        command, takes_flags = commands.COMMANDS[args[0]]
        try:
            command(args[1:])
        except (ValueError, FileNotFoundError) as error:
            # What the command's arguments name is wrong, not their syntax: no usage text. The settings named by
            # export and consolidate are the checkpoint's, which no flag of theirs sets.
            refuse(str(error), flags=takes_flags)
    else:
        build_cli(argv)


if __name__ == "__main__":
    main()
