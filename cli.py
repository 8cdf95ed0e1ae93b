"""Command-line entry point (installed as `moe`).

`python cli.py presets` prints every model preset with its total and active parameter counts, computed from the
config alone. Training commands (LightningCLI fit/validate/test/predict) arrive with the training module.
"""

from __future__ import annotations

import argparse
import sys

from moe.config import format_count
from moe.presets import PRESETS, get_preset, preset_names


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="moe", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("presets", help=f"list the {len(PRESETS)} model presets and their parameter counts")
    args = parser.parse_args(argv)
    if args.command == "presets":
        print_presets()


if __name__ == "__main__":
    main(sys.argv[1:])
