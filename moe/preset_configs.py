"""configs/model/<name>.yaml, generated from the presets of moe/presets.py so that the two cannot drift apart.

Each file holds the fields its PRESETS entry sets, in that order, under `model.config` (where LightningCLI reads
the model's config argument). Regenerate after editing a preset:

    python -m moe.preset_configs configs/model

tests/test_configs.py fails, naming this command, when a file differs from what it would write.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from moe.presets import PRESETS, preset_names

WRITE_COMMAND = "python -m moe.preset_configs configs/model"
_GENERATED = "generated from moe/presets.py"  # marks, on its first line, a file write_preset_configs owns


def preset_yaml(name: str) -> str:
    """The text of configs/model/<name>.yaml."""
    import yaml  # a dependency of jsonargparse; only this writer needs it

    header = (f"# Model preset {name}, {_GENERATED}: edit the preset there, then run\n"
              f"# {WRITE_COMMAND} (tests/test_configs.py checks that the two agree).\n")
    return header + yaml.safe_dump({"model": {"config": {"name": name, **PRESETS[name]}}}, sort_keys=False)


def write_preset_configs(directory: str | Path) -> list[Path]:
    """Write every preset's file into `directory` and delete the generated files of presets that are gone (files
    without the generated header are left alone). Returns the files written."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for path in directory.glob("*.yaml"):
        if path.stem not in PRESETS and _GENERATED in path.read_text().partition("\n")[0]:
            path.unlink()
    written = []
    for name in preset_names():
        path = directory / f"{name}.yaml"
        path.write_text(preset_yaml(name))
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m moe.preset_configs", description=__doc__.partition("\n")[0])
    parser.add_argument("directory", type=Path, help="where to write one YAML file per preset (configs/model)")
    for path in write_preset_configs(parser.parse_args(argv).directory):
        print(path)


if __name__ == "__main__":
    main()
