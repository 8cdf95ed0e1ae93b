"""Where a command-line run reads and writes. Used by cli.py, whose flags their messages name.

- `check_ckpt_path` refuses a --ckpt_path that names no checkpoint before any data is prepared.
- `place_loggers` puts each command's logs in its run: a resumed fit continues in the version folder of its
  checkpoint; validate/test/predict on a checkpoint write into that checkpoint's run, one subfolder per invocation
  (`<run>/validate/version_0`, ...), and on an HF directory under `runs/<its name>/`; without a logger setting a
  run logs CSV under `runs/` (Lightning's default is `lightning_logs/`, TensorBoard when installed).
- `claim_run_directory` gives each new run a `version_N` folder of its own even when two runs start at once, and
  lets a continued run append to its metrics.csv (Lightning's CSV writer deletes the file it finds).
"""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path

from fsspec.utils import get_protocol
from jsonargparse import Namespace
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from moe.errors import InputError
from moe.train.checkpoint import is_sharded_checkpoint


def check_ckpt_path(ckpt_path: str) -> None:
    """Raise InputError for a --ckpt_path that is neither a checkpoint file nor a sharded checkpoint directory. Lightning's own
    errors for it come only once the Trainer runs (fit: after the data is prepared) and as a traceback."""
    if ckpt_path in ("best", "last", "hpc") or ckpt_path.startswith("registry") or not _is_local(ckpt_path):
        return  # resolved by the Trainer, or remote: Lightning's to check
    path = Path(ckpt_path)
    if path.is_file() or is_sharded_checkpoint(path):
        return
    if path.is_dir():
        raise InputError(f"--ckpt_path {path} is a directory but not a sharded checkpoint (no .metadata file of "
                         "torch.distributed.checkpoint in it): give a .ckpt file or a sharded checkpoint directory")
    raise InputError(f"--ckpt_path {path}: no such checkpoint file or sharded checkpoint directory")


def _is_local(path: str) -> bool:
    return get_protocol(str(path)) in ("file", "local")


DEFAULT_ROOT = "runs"


def numbered_logger(class_path) -> bool:
    """Whether a config's logger class numbers its runs (version_N under save_dir/name): Lightning's CSVLogger and
    TensorBoardLogger, under any of their import paths or short names, and their subclasses."""
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    from moe.train.strategies import resolve_class

    if class_path in ("CSVLogger", "TensorBoardLogger"):  # jsonargparse resolves the short names in Lightning
        return True
    cls = resolve_class(class_path) if class_path else None
    return isinstance(cls, type) and issubclass(cls, (CSVLogger, TensorBoardLogger))


def checkpoint_run(ckpt_path: str | None) -> Path | None:
    """The run folder a checkpoint was saved in, where ModelCheckpoint puts it by default: `<run>/checkpoints/`,
    the run being a logger's version folder (`version_N`, or holding a config.yaml or metrics.csv). None for
    checkpoints elsewhere, Lightning's names ("last", "best") and remote paths."""
    if not ckpt_path or ckpt_path in ("best", "last", "hpc") or not _is_local(ckpt_path):
        return None
    folder = Path(ckpt_path).expanduser().absolute().parent
    if folder.name != "checkpoints":
        return None
    run = folder.parent
    is_run = re.fullmatch(r"version_\d+", run.name) or (run / "config.yaml").is_file() or (run / "metrics.csv").is_file()
    return run if is_run else None


def place_loggers(logger, subcommand: str, ckpt_path: str | None, init_from: str | None):
    """The trainer's `logger` setting (None, a bool, a class_path Namespace or a list of them) with each numbered
    logger (CSV, TensorBoard) pointed at the folder this command writes to; see the module docstring. A logger
    whose folder is not the checkpoint's run (one the user named) is left alone, as is one with a version set."""
    run = checkpoint_run(ckpt_path)
    default = logger is None or logger is True
    if default:  # no logger given: CSV under runs/, not lightning_logs/
        name = Path(init_from).name if init_from and subcommand != "fit" else "default"
        logger = Namespace(class_path="lightning.pytorch.loggers.CSVLogger",
                           init_args=Namespace(save_dir=DEFAULT_ROOT, name=name))
        if run is None and subcommand != "fit":  # evaluating an HF directory: runs/<its name>/<command>/version_N
            logger.init_args.save_dir, logger.init_args.name = f"{DEFAULT_ROOT}/{name}", subcommand
    entries = logger if isinstance(logger, list) else [logger]
    for entry in entries:
        if not isinstance(entry, Namespace) or not numbered_logger(entry.get("class_path")):
            continue
        args = entry.init_args
        if args.get("version") is not None or run is None:
            continue
        root = Path(args.get("save_dir") or ".") / (args.get("name") or "")
        same_root = root.expanduser().absolute() == run.parent
        if not same_root and not default:
            continue
        if subcommand == "fit":  # the resumed run's own folder (and metrics.csv, appended to)
            if not same_root:  # the default logger: the checkpoint's folder, as the run named it
                args.save_dir, args.name = _relative(run.parent.parent), run.parent.name
            args.version = run.name
        else:
            args.save_dir, args.name = _relative(run), subcommand  # <run>/<command>/version_N
    return logger


def _relative(path: Path) -> str:
    """`path` relative to the working directory when inside it, as a run's own settings name its folder (Lightning
    compares a resumed checkpoint's folder with the new one as strings)."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


class ContinuingCSVWriter(ExperimentWriter):
    """Lightning's CSV writer, except that a metrics.csv already in the folder (a resumed run's) is continued:
    Lightning's deletes it. The header is read back so that new rows append under it (a new metric rewrites the
    file with the wider header, as Lightning's writer does within a run)."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                self.metrics_keys = list(csv.DictReader(file).fieldnames or [])


def continue_metrics(logger: CSVLogger) -> None:
    """Make `logger` append to the metrics.csv in its folder, if there is one (before it writes anything)."""
    if logger._experiment is None and _is_local(logger.log_dir) \
            and os.path.isfile(os.path.join(logger.log_dir, ExperimentWriter.NAME_METRICS_FILE)):
        logger._experiment = ContinuingCSVWriter(logger.log_dir)


def forget_rows_from(trainer: Trainer, step: int) -> None:
    """Drop the rows from `step` on (0-based, as Lightning numbers logged steps) from the metrics.csv of each CSV
    logger: a fit resumed from an earlier checkpoint logs those steps again. Global rank 0 only."""
    if trainer.global_rank != 0:
        return
    for logger in trainer.loggers:
        path = os.path.join(logger.log_dir, ExperimentWriter.NAME_METRICS_FILE) \
            if isinstance(logger, CSVLogger) and _is_local(logger.log_dir) else None
        if path is None or not os.path.isfile(path):
            continue
        with open(path, newline="") as file:
            reader = csv.DictReader(file)
            fields, rows = reader.fieldnames or [], list(reader)
        kept = [row for row in rows if not row.get("step") or int(float(row["step"])) < step]
        if len(kept) < len(rows):
            with open(path, "w", newline="") as file:
                writer = csv.DictWriter(file, fieldnames=fields)
                writer.writeheader()
                writer.writerows(kept)


def claim_run_directory(trainer: Trainer) -> None:
    """Create the next free `version_N` of each logger that numbers its runs (CSVLogger, TensorBoardLogger) with
    os.mkdir, which fails if the directory exists, and fix the logger's version to it.

    Lightning picks the version by listing the existing directories, so two runs started at once with the same
    logger name both take the same one, and interleave their metrics.csv, config.yaml and checkpoints in it.
    Claimed on global rank 0 only; the other ranks receive the directory from Lightning's broadcasts of
    `trainer.log_dir` and of ModelCheckpoint's folder. A version given explicitly is left alone, as is a remote one.
    """
    if trainer.global_rank != 0:
        return
    claimed: dict[str, int] = {}  # loggers of this run that share a folder share its version, as Lightning's would
    for logger in trainer.loggers:
        if isinstance(logger, CSVLogger) and logger._version is not None:
            continue_metrics(logger)  # `_experiment`: Lightning creates its writer lazily, with no way to choose it
        # `_version` and `_get_next_version` are private: Lightning's loggers have no public way to set a version
        # after construction, and the listing is the one Lightning itself would have made.
        if not isinstance(logger, (CSVLogger, TensorBoardLogger)) or logger._version is not None \
                or not _is_local(logger.root_dir):
            continue
        root = os.path.abspath(logger.root_dir)
        if root not in claimed:
            os.makedirs(root, exist_ok=True)
            version = logger._get_next_version()
            while True:
                try:
                    os.mkdir(os.path.join(root, f"version_{version}"))
                    break
                except FileExistsError:  # another run took it since the listing: the next one
                    version += 1
            claimed[root] = version
        logger._version = claimed[root]
