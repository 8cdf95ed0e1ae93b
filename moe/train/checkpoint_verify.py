"""Verifying a checkpoint file before it is read.

`verify_checkpoint` checks the CRC-32 that `torch.save` stores for every record of its zip archive (on by default:
`torch.serialization.get_crc32_options()`), because `torch.load` does not: a flipped bit in tensor data loads
silently, and a truncated file fails with a miniz error that names no file.
"""

from __future__ import annotations

import mmap
import os
import struct
import warnings
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from moe.errors import InputError

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
