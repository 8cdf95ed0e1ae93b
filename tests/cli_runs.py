"""What the command-line tests share: the quickstart's config files, the shared evaluation data, and the tiny
run (a small model and corpus) that stands in for the quickstart so a test takes seconds."""

import json
import os
import random
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parent.parent
# ../shared/evaldata beside the repository (the workspace layout); $MOE_EVAL_DATA where a clone lives elsewhere.
EVALDATA = next((Path(p) for p in (os.environ.get("MOE_EVAL_DATA"), ROOT.parent / "shared" / "evaldata",
                                   "/work/shared/evaldata") if p and Path(p).is_dir()), None)
needs_evaldata = pytest.mark.skipif(EVALDATA is None, reason="no ../shared/evaldata and no $MOE_EVAL_DATA")
QUICKSTART = ["--config", str(ROOT / "configs/model/tiny-moe.yaml"), "--config", str(ROOT / "configs/data/stdlib.yaml"),
              "--config", str(ROOT / "configs/trainer/cpu.yaml"), "--config",
              str(ROOT / "configs/experiment/quickstart.yaml")]


def write_tiny_run(folder: Path) -> None:
    """A corpus of 40 small files (corpus/doc00.txt to doc39.txt) and tiny-callbacks.yaml, the quickstart's callbacks
    with a checkpoint every 3 steps instead of 100 (a later --config replaces the experiment's callback list)."""
    corpus = folder / "corpus"
    corpus.mkdir()
    rng = random.Random(0)
    words = ["def", "return", "class", "import", "self", "value", "index", "count", "items", "print", "if", "else",
             "for", "while", "in", "not"]
    for i in range(40):
        lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 9))) for _ in range(30)]
        (corpus / f"doc{i:02d}.txt").write_text("\n".join(lines) + "\n")
    experiment = yaml.safe_load((ROOT / "configs/experiment/quickstart.yaml").read_text())
    callbacks = experiment["trainer"]["callbacks"]
    callbacks[0]["init_args"]["every_n_train_steps"] = 3
    (folder / "tiny-callbacks.yaml").write_text(yaml.safe_dump({"trainer": {"callbacks": callbacks}}))


def fit_tiny_run(folder: Path, *extra: str) -> Path:
    """A tiny fit in a folder of its own (corpus, caches, working directory), for module-scoped fixtures, which
    cannot use the `workdir` fixture; the run's version folder."""
    import sys

    import cli

    write_tiny_run(folder)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        patch.setattr(sys, "argv", ["cli.py"])
        patch.setenv("MOE_CACHE_DIR", str(folder / "cache"))
        cli.main(["fit", *tiny_run_args(folder), *extra])
    return folder / "runs" / "quickstart" / "version_0"


def tiny_run_args(workdir: Path) -> list[str]:
    """The quickstart configs with a smaller model, corpus and run, so the test takes seconds."""
    return QUICKSTART + [
        "--model.config.d_model", "64", "--model.config.n_layers", "2", "--model.config.max_seq_len", "32",
        "--data.sources", json.dumps([{"path": str(workdir / "corpus")}]), "--data.vocab_size", "320",
        "--data.batch_size", "4", "--data.num_workers", "0", "--data.prompts", '["def "]',
        "--model.warmup_steps", "2", "--model.sampling.max_new_tokens", "8",
        "--trainer.max_steps", "6", "--trainer.val_check_interval", "3", "--trainer.limit_val_batches", "2",
        "--trainer.log_every_n_steps", "2", "--config", str(workdir / "tiny-callbacks.yaml"),
    ]


def refused(capsys, args: list[str]) -> str:
    """Run the command `args`, which must end as bad input does: exit status 2, no traceback, no usage text and one
    `error:` message, the end of stderr (a list of changes may follow on the next lines); that message."""
    import cli

    with pytest.raises(SystemExit) as exit_:
        cli.main(args)
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err[-3000:]
    # compute_fn: jsonargparse's dump of a failed link (the vocabulary size), which buries the message.
    assert "Traceback" not in err and "usage:" not in err and "compute_fn" not in err, err[-3000:]
    lines = err.rstrip().splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("error:")]
    assert len(starts) == 1, err[-3000:]
    return "\n".join(lines[starts[0]:])
