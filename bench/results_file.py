"""Where every benchmark writes its record: one JSON file, indented, its folder created, its path printed."""

from __future__ import annotations

import json
from pathlib import Path


def write_results(path: str | Path, record: dict, note: str = "") -> None:
    """Write `record` as indented JSON to `path` and say so (after `note`, e.g. why a run was skipped)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"{note}wrote {path}")
