"""Where a command-line run reads and writes: `check_ckpt_path` refuses a --ckpt_path that names no checkpoint
before any data is prepared, and `claim_run_directory` gives each run a `version_N` folder of its own even when
two runs start at once. Used by cli.py, whose flags their messages name.
"""

from __future__ import annotations

import os
from pathlib import Path

from fsspec.utils import get_protocol
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

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
