"""Crash-safe and verified checkpoint files.

`AtomicCheckpointIO` writes a checkpoint to a temporary file beside its target, syncs it to disk and renames it into
place (the write-fsync-rename recipe of POSIX `rename(2)`), so a crash in the middle of a save leaves the previous
checkpoint whole. Lightning's own `TorchCheckpointIO` writes through an fsspec transaction that stages the file in
the system temp folder: moved across file systems that is a copy over the target, and nothing is synced.

A save the file system refuses (a full disk) raises `CheckpointNotSaved`, one line naming the file and the cause.

`verify_checkpoint` checks the CRC-32 that `torch.save` stores for every record of its zip archive (on by default:
`torch.serialization.get_crc32_options()`), because `torch.load` does not: a flipped bit in tensor data loads
silently, and a truncated file fails with a miniz error that names no file.
"""

from __future__ import annotations

import errno
import mmap
import os
import shutil
import struct
import warnings
import zipfile
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from fsspec.core import strip_protocol
from fsspec.utils import get_protocol
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from moe.errors import CheckpointNotSaved, InputError

# The zip structures torch.save writes (PKWARE APPNOTE.TXT, sections 4.3.7 to 4.3.16).
_LOCAL_HEADER = struct.Struct("<4s5H3L2H")  # signature, versions, flags, method, time, date, CRC, sizes, lengths
_END = struct.Struct("<4s4H2LH")  # signature, disks, entries here and in all, directory size and offset, comment
_END64_LOCATOR = struct.Struct("<4sLQL")  # signature, disk and offset of the zip64 end record, disks
_END64 = struct.Struct("<4sQ2H2L4Q")  # signature, size, versions, disks, entries, directory size and offset
_CENTRAL_HEADER_SIZE = 46
_NAME_EXTRA_COMMENT_LENGTHS, _NAME_EXTRA_COMMENT_LENGTHS_OFFSET = struct.Struct("<3H"), 28  # in a directory entry
_LOCAL_SIGNATURE, _END_SIGNATURE = b"PK\x03\x04", b"PK\x05\x06"
_END64_LOCATOR_SIGNATURE, _END64_SIGNATURE = b"PK\x06\x07", b"PK\x06\x06"
_UNREADABLE_FLAGS = 0x2061  # encrypted, patched, strongly encrypted, masked directory: miniz refuses them
_DIRECTORY_ATTRIBUTE = 0x10  # MS-DOS attribute miniz reads as "this record is a folder"


class CorruptCheckpointError(InputError):
    """A checkpoint file that is truncated, damaged or not a checkpoint at all."""


def _is_local(path: str | os.PathLike) -> bool:
    return get_protocol(str(path)) in ("file", "local")


def verify_checkpoint(path: str | os.PathLike) -> None:
    """Raise `CorruptCheckpointError`, naming the file, unless it is a complete `torch.save` archive whose every
    record matches its CRC-32.

    Reads the whole file once (memory-mapped, so a load that follows finds it in the page cache).
    """
    path = Path(path)
    advice = f"resume from (or load) an earlier checkpoint in {path.parent} instead"

    def corrupt(problem: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"checkpoint {path} is {problem}; {advice}")

    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(4)
        f.seek(max(size - _END.size, 0))
        ends_as_zip = size >= _END.size and f.read(4) == _END_SIGNATURE
        if not ends_as_zip and _LOCAL_SIGNATURE.startswith(head):  # the beginning of a zip, or less
            raise corrupt(f"truncated ({size:,} bytes, no zip end-of-archive record at the end): the save that "
                          "wrote it did not finish, or its end was damaged")
        if not ends_as_zip:
            raise corrupt("not a checkpoint: not the zip archive torch.save writes")
        if head != _LOCAL_SIGNATURE:
            raise corrupt("damaged: its first bytes are not a zip record header")
        try:
            archive = zipfile.ZipFile(f)
        except Exception as e:  # BadZipFile, or struct/Unicode errors from a damaged directory
            raise corrupt(f"damaged: its zip directory cannot be read ({e})") from e
        records = archive.infolist()
        # No CRC-32s to check when saved under torch.serialization.set_crc32_options(False): a real record's CRC
        # is 0 with probability 2**-32, and every archive holds non-empty records.
        with_crcs = any(r.CRC for r in records)
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped, memoryview(mapped) as data:
            try:
                _check_archive(data, records, archive.start_dir, with_crcs)
            except _Damage as e:
                raise corrupt(f"damaged: {e}") from None
    if not any(r.filename.endswith("/data.pkl") for r in records):
        raise corrupt("not a checkpoint: a zip archive without the data.pkl record torch.save writes")
    if not with_crcs:
        warnings.warn(f"{path} was saved without CRC-32s (torch.serialization.set_crc32_options(False)): its "
                      "contents cannot be verified")


class _Damage(Exception):
    """What is wrong with an archive, in words."""


def _check_archive(data: memoryview, records: list[zipfile.ZipInfo], start_dir: int, with_crcs: bool) -> None:
    """Python's zipfile forgives what torch's reader (miniz) refuses, and neither reads the CRC-32s on load:
    check the end records, that every record is one torch reads, and the CRCs."""
    _check_end_records(data, records, start_dir)
    for record in records:
        if record.compress_type != zipfile.ZIP_STORED or record.file_size != record.compress_size or \
                record.flag_bits & _UNREADABLE_FLAGS or record.volume or record.comment or \
                record.external_attr & _DIRECTORY_ATTRIBUTE:
            raise _Damage(f"the directory entry of record {record.filename!r} is not one torch.save writes")
    # zlib releases the GIL, so records are checked in parallel; in file order, each local header just before its
    # data, so that a file not yet in the page cache is read front to back rather than by a seek per record.
    with ThreadPoolExecutor(_threads()) as pool:
        for _ in pool.map(lambda record: _check_record(record, data, with_crcs),
                          sorted(records, key=lambda r: r.header_offset)):
            pass


def _threads() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(cores, 8)  # beyond a few threads the memory bandwidth, not the CRC, is the limit


def _check_record(record: zipfile.ZipInfo, data: memoryview, with_crc: bool) -> None:
    """The record's local header agrees with its directory entry, and its data with its CRC-32."""
    header_end = record.header_offset + _LOCAL_HEADER.size
    if header_end > len(data):
        raise _Damage(f"record {record.filename!r} has a header offset beyond the end of the file")
    signature, *_, name_length, extra_length = _LOCAL_HEADER.unpack(data[record.header_offset:header_end])
    name = bytes(data[header_end:header_end + name_length])
    if signature != _LOCAL_SIGNATURE or name != _encoded_name(record):
        raise _Damage(f"no local header of record {record.filename!r} at byte {record.header_offset:,}")
    start = header_end + name_length + extra_length
    end = start + record.compress_size
    if end > len(data):
        raise _Damage(f"record {record.filename!r} has data beyond the end of the file")
    if with_crc and zlib.crc32(data[start:end]) != record.CRC:
        raise _Damage(f"CRC-32 mismatch in record {record.filename!r} (bytes {start:,} to {end:,})")


def _encoded_name(record: zipfile.ZipInfo) -> bytes:
    return record.orig_filename.encode("utf-8" if record.flag_bits & 0x800 else "cp437")


def _check_end_records(data: memoryview, records: list[zipfile.ZipInfo], start_dir: int) -> None:
    """The end-of-archive record (and the zip64 ones torch.save adds) must describe exactly this directory."""
    size, n = len(data), len(records)
    # Measured from the raw entries: zipfile clips a name or comment whose length runs past the directory.
    directory_size = 0
    for _ in records:
        if start_dir + directory_size + _CENTRAL_HEADER_SIZE > size:
            raise _Damage("its zip directory runs past the end of the file")
        directory_size += _CENTRAL_HEADER_SIZE + sum(_NAME_EXTRA_COMMENT_LENGTHS.unpack_from(
            data, start_dir + directory_size + _NAME_EXTRA_COMMENT_LENGTHS_OFFSET))
    directory_end = size - _END.size
    _, disk, directory_disk, here, total, size32, offset32, comment = _END.unpack(data[directory_end:])
    placeholders = (0xFFFF, 0xFFFFFFFF)  # fields too small for their value point to the zip64 record
    locator = directory_end - _END64_LOCATOR.size
    if locator >= 0 and data[locator:locator + 4] == _END64_LOCATOR_SIGNATURE:
        _, end64_disk, end64_offset, disks = _END64_LOCATOR.unpack(data[locator:directory_end])
        directory_end = locator - _END64.size
        end64 = _END64.unpack(data[directory_end:locator]) if directory_end >= 0 else None
        if (end64_disk, end64_offset, disks) != (0, directory_end, 1) or end64 is None or \
                (end64[0], end64[1], *end64[4:]) != (_END64_SIGNATURE, _END64.size - 12, 0, 0, n, n, directory_size,
                                                    start_dir):
            raise _Damage("its zip64 end-of-archive record does not describe its directory")
    else:
        placeholders = ()
    if (disk, directory_disk, comment) != (0, 0, 0) or here != total or \
            here not in (n, *placeholders[:1]) or size32 not in (directory_size, *placeholders[1:]) or \
            offset32 not in (start_dir, *placeholders[1:]) or start_dir + directory_size != directory_end:
        raise _Damage("its end-of-archive record does not describe its directory")


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
