"""Reading the documents of one file: the whole file for plain text, one per record for JSONL and Parquet.

A file that cannot be read as documents fails loudly and names the file (and for JSONL the line), because a
silently skipped file is a silently different training run.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from moe.errors import InputError

JSONL_SUFFIXES = {".jsonl", ".ndjson", ".json"}
PARQUET_SUFFIXES = {".parquet"}


class DataError(InputError):
    """Input data that cannot be used; the message names the file (and line) at fault."""


def read_documents(path: Path, text_field: str = "text") -> Iterator[str]:
    """Documents of one file: the whole file for text, one per record for JSONL and Parquet."""
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        reader = _read_jsonl
    elif suffix in PARQUET_SUFFIXES:
        reader = _read_parquet
    else:
        reader = _read_text
    n_documents = 0
    for text in reader(path, text_field):
        if text:
            n_documents += 1
            yield text
    if n_documents == 0:
        raise DataError(f"{path}: empty file (no text); add text to it or leave it out of the source")


def _read_text(path: Path, text_field: str) -> Iterator[str]:
    data = path.read_bytes()
    yield _decode(data, str(path))


def _decode(data: bytes, where: str) -> str:
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise DataError(f"{where}: UTF-16 text (byte-order mark); convert it to UTF-8")
    if b"\0" in data:
        raise DataError(f"{where}: contains NUL bytes, so it is binary or UTF-16/32 text; convert it to UTF-8")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: not valid UTF-8 (byte offset {e.start}); convert it to UTF-8") from None


def json_records(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line of a JSON-lines file. A line that is not UTF-8 text or not
    a JSON object raises a DataError naming the file and line (also used by the evaluation harness)."""
    with open(path, "rb") as f:
        for line_number, raw in enumerate(f, start=1):
            where = f"{path}:{line_number}"
            if not raw.strip():
                continue
            line = _decode(raw, where)
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                truncated = " (truncated last line?)" if not raw.endswith(b"\n") else ""
                if line_number == 1 and line.lstrip().startswith("["):
                    fix = _ONE_ARRAY
                else:
                    fix = "each line must be one complete JSON object; fix or delete this line"
                raise DataError(f"{where}: malformed JSON{truncated}: {e.msg} (column {e.colno}); {fix}") from None
            if not isinstance(record, dict):
                kind = _JSON_KINDS.get(type(record), type(record).__name__)
                fix = _ONE_ARRAY if isinstance(record, list) else "write one object per line"
                raise DataError(f'{where}: expected a JSON object like {{"text": ...}}, got {kind}; {fix}')
            yield line_number, record


_JSON_KINDS = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean",
               type(None): "null"}
_ONE_ARRAY = "if the file is one JSON array, write its objects one per line instead (jq -c '.[]' does that)"


def _read_jsonl(path: Path, text_field: str) -> Iterator[str]:
    for line_number, record in json_records(path):
        where = f"{path}:{line_number}"
        if text_field not in record:
            raise DataError(f"{where}: record has no field {text_field!r} (fields: {sorted(record)})")
        text = record[text_field]
        if not isinstance(text, str):
            raise DataError(f"{where}: field {text_field!r} is {type(text).__name__}, not a string")
        yield text


def _read_parquet(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    columns = parquet.schema_arrow.names
    if text_field not in columns:
        raise DataError(f"{path}: no column {text_field!r} (columns: {columns})")
    if not pa.types.is_string(parquet.schema_arrow.field(text_field).type) and not pa.types.is_large_string(
        parquet.schema_arrow.field(text_field).type
    ):
        raise DataError(f"{path}: column {text_field!r} has type {parquet.schema_arrow.field(text_field).type}")
    for batch in parquet.iter_batches(columns=[text_field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if text is not None:
                yield text
