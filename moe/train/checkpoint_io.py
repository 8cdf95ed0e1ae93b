"""Crash-safe checkpoint files.

`AtomicCheckpointIO` writes a checkpoint to a temporary file beside its target, syncs it to disk and renames it into
place (the write-fsync-rename recipe of POSIX `rename(2)`), so a crash in the middle of a save leaves the previous
checkpoint whole. Lightning's own `TorchCheckpointIO` writes through an fsspec transaction that stages the file in
the system temp folder: moved across file systems that is a copy over the target, and nothing is synced.

A save the file system refuses (a full disk) raises `CheckpointNotSaved`, one line naming the file and the cause.

Reading one back is checked by `checkpoint_verify.verify_checkpoint`.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from fsspec.core import strip_protocol
from fsspec.utils import get_protocol
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from moe.errors import CheckpointNotSaved
from moe.train.checkpoint_verify import verify_checkpoint


def _is_local(path: str | os.PathLike) -> bool:
    return get_protocol(str(path)) in ("file", "local")


def atomic_save(checkpoint: dict[str, Any], path: str | os.PathLike) -> None:
    """`torch.save` to a local `path` that either keeps its previous contents or holds the whole new checkpoint,
    whenever the process or the machine stops.

    A write the file system refuses (no space left, no permission) raises `CheckpointNotSaved` naming the file and
    the cause, with no temporary file left behind: torch.save reports a full disk as a zip writer's "unexpected
    pos" RuntimeError, the OSError that says why only in its context."""
    path = Path(path)
    # Hidden and not ending in .ckpt, so neither ModelCheckpoint nor ckpt_path="last" takes a leftover from a killed
    # process for a checkpoint. One per process: a later run that reuses the pid (containers do) overwrites it.
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(temp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())  # the data reaches the disk before the rename that publishes it
        os.replace(temp, path)
    except BaseException as error:
        try:
            temp.unlink(missing_ok=True)
        except OSError:  # the folder itself is not usable (not a directory, not writable): no temporary in it
            pass
        cause = _os_error(error) if isinstance(error, Exception) else None  # an interrupt stays an interrupt
        if cause is None:
            raise
        raise CheckpointNotSaved(_not_saved_message(path, cause, checkpoint)) from error
    _fsync_directory(path.parent)  # the rename itself survives a power loss


def _os_error(error: BaseException) -> OSError | None:
    """The operating system's error that `error` is or was raised while handling (its cause or context chain)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError) and error.errno is not None:
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _not_saved_message(path: Path, error: OSError, checkpoint: Any) -> str:
    reason = error.strerror or str(error)
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        needed = _tensor_bytes(checkpoint)
        try:
            free = f", {_format_bytes(shutil.disk_usage(path.parent).free)} free there"
        except OSError:
            free = ""
        reason += f" (the checkpoint needs about {_format_bytes(needed)}{free})" if needed else ""
    kept = f"the previous {path.name} is intact" if path.exists() else "nothing was written"
    return f"could not save checkpoint {path}: {reason}; {kept}"


def _tensor_bytes(obj: Any) -> int:
    """Bytes of the tensor storages in a checkpoint (each storage once): nearly all of what torch.save writes."""
    total, seen, stack = 0, set(), [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            try:
                storage = item.untyped_storage()
                key = (str(storage.device), storage.data_ptr())
            except (RuntimeError, NotImplementedError, TypeError):  # subclasses without one storage (DTensor)
                total += item.numel() * item.element_size()
                continue
            if key not in seen:
                seen.add(key)
                total += storage.nbytes()
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return total


def _format_bytes(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # Windows cannot open a directory; its renames are journaled by NTFS
        return
    try:
        os.fsync(fd)
    except OSError:  # some network file systems refuse to sync a directory
        pass
    finally:
        os.close(fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """`TorchCheckpointIO` that saves local checkpoints atomically (`atomic_save`) and verifies local checkpoints
    before loading them (`verify_checkpoint`)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local(path):
            # Object stores (s3://, gs://, ...) have no rename into place; Lightning uploads the whole object in
            # one request, which those stores publish atomically. It also raises for storage_options.
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_save(checkpoint, strip_protocol(str(path)))

    def load_checkpoint(self, path, map_location: Callable | None = lambda storage, loc: storage,
                        weights_only: bool | None = None) -> dict[str, Any]:
        if _is_local(path) and os.path.isfile(strip_protocol(str(path))):
            verify_checkpoint(strip_protocol(str(path)))
        return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)


def install_atomic_checkpoint_io(trainer) -> None:
    """Give the trainer's strategy an `AtomicCheckpointIO` where it has Lightning's default `TorchCheckpointIO`;
    a checkpoint IO the user chose, or a strategy's own (sharded, DeepSpeed, async), is left alone.

    With several processes only rank 0 writes, and the others wait for it in a barrier: a save that fails on rank 0
    alone would leave them waiting (NCCL) or dying on a closed connection with a traceback (gloo). So the outcome
    is broadcast after the write and every process raises the same `CheckpointNotSaved`."""
    strategy = trainer.strategy
    if type(strategy.checkpoint_io) is not TorchCheckpointIO:
        return
    strategy.checkpoint_io = AtomicCheckpointIO()
    if trainer.world_size > 1 and not hasattr(strategy.save_checkpoint, "agrees_on_failure"):
        strategy.save_checkpoint = _agreeing_on_failure(strategy, strategy.save_checkpoint)


def _agreeing_on_failure(strategy, save: Callable) -> Callable:
    def save_checkpoint(checkpoint: dict[str, Any], filepath, storage_options: Any | None = None) -> None:
        failure = None
        try:
            save(checkpoint, filepath, storage_options=storage_options)
        except CheckpointNotSaved as error:
            failure = str(error)
        failure = strategy.broadcast(failure, src=0)
        if failure is not None:
            raise CheckpointNotSaved(failure)

    save_checkpoint.agrees_on_failure = True
    return save_checkpoint
