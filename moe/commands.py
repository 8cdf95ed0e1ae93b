"""The command line's commands beside LightningCLI's fit/validate/test/predict: `export` (a checkpoint as an HF model
directory), `consolidate` (a sharded checkpoint as one file), `export-tokens` (the token caches of a data
config as pre-tokenized shards), `plot` (the training curves of runs as PNG files), `plan` and `ladder` (moe/planning/). Each raises ValueError
(InputError) or FileNotFoundError for what its arguments name; cli.py prints that as one line.
"""

from __future__ import annotations

import argparse

import torch

from moe.planning.command import ladder as ladder_run
from moe.planning.command import plan as plan_run
from moe.train.checkpoint import consolidate_checkpoint
from moe.train.export import export_to_hf

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def export(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="moe export", description="Write a Lightning checkpoint of this "
                                     "project as an HF model directory (weights, config.json, tokenizer).")
    parser.add_argument("checkpoint", help="a .ckpt written by `fit` (e.g. runs/quickstart/version_0/checkpoints/"
                        "last.ckpt) or a sharded checkpoint directory")
    parser.add_argument("out_dir", help="directory to write; AutoModelForCausalLM/AutoTokenizer load it")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="weight dtype (default: float32)")
    args = parser.parse_args(argv)
    out = export_to_hf(args.checkpoint, args.out_dir, DTYPES.get(args.dtype))
    print(f"wrote {out}")


def consolidate(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="moe consolidate", description="Write a sharded checkpoint directory "
                                     "(FSDPStrategy with state_dict_type sharded, ModelParallelStrategy) as one "
                                     ".ckpt file, which resumes under any strategy or world size.")
    parser.add_argument("src", help="sharded checkpoint directory, e.g. runs/x/version_0/checkpoints/last.ckpt/")
    parser.add_argument("dst", help=".ckpt file to write")
    args = parser.parse_args(argv)
    out = consolidate_checkpoint(args.src, args.dst)
    print(f"wrote {out}")


def export_tokens(argv: list[str]) -> None:
    from jsonargparse import ActionConfigFile, ArgumentParser

    from moe.data import TextDataModule
    from moe.data.pretokenized import export_tokens as write_shards

    parser = ArgumentParser(prog="moe export-tokens", description="Tokenize (or read from the cache) the sources of "
                            "a data config and write each as pre-tokenized shards (raw .bin token arrays, nanoGPT / "
                            "OLMo layout) with a metadata.json and the tokenizer; such a folder is a data source.")
    parser.add_argument("--config", action=ActionConfigFile, help="a data config, e.g. configs/data/stdlib.yaml")
    parser.add_class_arguments(TextDataModule, "data")
    parser.add_argument("out_dir", help="folder to write, one subfolder per source")
    args = parser.parse_args(argv)
    data = parser.instantiate_classes(args).data
    data.corpus.prepare(show_progress=True)
    for folder in write_shards(data.corpus, args.out_dir):
        print(f"wrote {folder}")


def plot(argv: list[str]) -> None:
    from moe.plot import X_AXES, plot_runs  # matplotlib only for this command

    parser = argparse.ArgumentParser(prog="moe plot", description="Draw the training curves of one or several runs "
                                     "as PNG files: loss.png (train and validation loss), lr.png, throughput.png, "
                                     "and per MoE run with an expert_load.jsonl a heatmap of each layer's expert "
                                     "load over steps (expert_load.png).")
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="a run's folder holding metrics.csv, e.g. "
                        "runs/quickstart/version_0, or runs/quickstart for its latest version")
    parser.add_argument("--out", default=None, help="folder to write (default: the first run's plots/)")
    parser.add_argument("--x", choices=X_AXES, default="step", help="x axis of the curves: optimizer step or "
                        "tokens seen (default: step)")
    parser.add_argument("--labels", nargs="+", default=None, metavar="LABEL", help="one name per run, in order, "
                        "for legends and file names (default: each folder relative to the runs' common parent)")
    args = parser.parse_args(argv)
    for path in plot_runs(args.run_dirs, args.out, x=args.x, labels=args.labels):
        print(f"wrote {path}")


# name -> (function, whether the settings its errors name are flags of the command)
COMMANDS = {"export": (export, False), "consolidate": (consolidate, False), "export-tokens": (export_tokens, True),
            "plot": (plot, False), "plan": (plan_run, False), "ladder": (ladder_run, False)}
