"""The command line's errors: a bad flag or config file, bad data, and a model that cannot take the data's token
ids each end with a message that names the key, file (and line) or flag, and a non-zero exit, before any step.

jsonargparse names the key for an error inside a --config file, not the file (it names the file only when it cannot
read it), so the file tests below look for the key."""

import dataclasses
import json
import random

import pytest
import torch
import yaml

import cli
from moe import build_model, get_preset
from moe.data.tokenizer import train_tokenizer
from moe.hf import save_hf_checkpoint

from .cli_runs import QUICKSTART, tiny_run_args

# ------------------------------------------------------------------------------------------------ bad config


@pytest.mark.parametrize("args,names", [
    (["--model.config.d_modle", "64"], "d_modle"),
    (["--model.config.d_model", "wide"], "model.config.d_model"),
    (["--trainer.max_stepz", "3"], "max_stepz"),
    (["--data.batch_size", "1.5"], "data.batch_size"),
])
def test_bad_config_exits_non_zero_naming_the_key(workdir, capsys, args, names):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["fit", *QUICKSTART, *args, "--print_config"])
    assert exit_.value.code not in (0, None)
    assert names in capsys.readouterr().err


@pytest.mark.parametrize("text,names", [
    ("model:\n  config:\n    n_expertz: 4\n", "n_expertz"),
    ("model:\n  config:\n    d_model: wide\n", "model.config.d_model"),
])
def test_bad_config_file_exits_non_zero_naming_the_key(workdir, capsys, text, names):
    bad = workdir / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["fit", *QUICKSTART, "--config", str(bad), "--print_config"])
    assert exit_.value.code not in (0, None)
    assert names in capsys.readouterr().err


@pytest.mark.parametrize("where", ["flag", "file"])
def test_missing_required_value_exits_non_zero_naming_it(workdir, capsys, where):
    # A source without a path (--print_config prints incomplete configs, so this is a run's parse).
    sources = [{"path": str(workdir / "corpus")}, {"weight": 2.0}]
    if where == "flag":
        given = ["--data.sources", json.dumps(sources)]
    else:
        (workdir / "data.yaml").write_text(yaml.safe_dump({"data": {"sources": sources}}))
        given = ["--config", str(workdir / "data.yaml")]
    with pytest.raises(SystemExit) as exit_:
        cli.main(["fit", *tiny_run_args(workdir), *given])
    assert exit_.value.code not in (0, None)
    err = capsys.readouterr().err
    assert "data.sources" in err and "required: path" in err


def test_missing_config_file_is_named(workdir, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["fit", *QUICKSTART, "--config", str(workdir / "no-such.yaml"), "--print_config"])
    assert exit_.value.code not in (0, None)
    assert str(workdir / "no-such.yaml") in capsys.readouterr().err


def test_a_run_without_a_model_config_is_refused(workdir, capsys):
    # Every ModelConfig field has a default, so a forgotten model file would otherwise build the defaults: a
    # LLaMA-7B shape, found out only by running out of memory.
    args = tiny_run_args(workdir)
    assert QUICKSTART[1].endswith("configs/model/tiny-moe.yaml")
    without_model = QUICKSTART[2:] + args[args.index("--data.sources"):args.index("--trainer.max_steps")]
    with pytest.raises(SystemExit) as exit_:
        cli.build_cli(without_model, run=False)
    assert exit_.value.code not in (0, None)
    assert "model.config" in capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["--model.config.n_heads", "3"], "n_heads=3"),
    (["--model.schedule", "linear"], "--model.schedule='linear'"),
    (["--data.sources", '[{"path": "no/such/dir"}]'], "no/such/dir"),
])
def test_inconsistent_values_exit_non_zero_with_the_reason(workdir, capsys, args, message):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["fit", *tiny_run_args(workdir), *args])
    assert exit_.value.code not in (0, None)
    assert message in capsys.readouterr().err


def test_export_errors_name_the_file(workdir, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["export", str(workdir / "missing.ckpt"), str(workdir / "out")])
    assert exit_.value.code == 2 and "missing.ckpt" in capsys.readouterr().err
    assert not (workdir / "out").exists()


# ------------------------------------------------------------------------------------------------ bad data

TRUNCATED = "".join(json.dumps({"text": f"def value {i}"}) + "\n" for i in range(3)) + '{"text": "def val'
BAD_FILES = {
    "empty.txt": b"",
    "random.dat": random.Random(0).randbytes(2048),
    "utf16.txt": "def value(self):\n    return count\n".encode("utf-16"),
    "truncated.jsonl": TRUNCATED.encode(),
    "array.jsonl": b'{"text": "def value"}\n["def", "value"]\n',
}


def fit_args(workdir, source: str, *extra: str) -> list[str]:
    args = tiny_run_args(workdir)
    args[args.index("--data.sources") + 1] = json.dumps([{"path": source}])
    return ["fit", *args, *extra]


def assert_refused_before_training(workdir, capsys, args, *named: str) -> str:
    with pytest.raises(SystemExit) as exit_:
        cli.main(args)
    err = capsys.readouterr().err
    assert exit_.value.code not in (0, None)
    for name in named:
        assert name in err
    assert not list(workdir.rglob("*.ckpt")) and not list(workdir.rglob("metrics.csv"))
    return err


# Every kind of bad file once and every way of giving it once; tests/data/test_bad_data.py has all combinations.
@pytest.mark.parametrize("name,place,line", [
    ("empty.txt", "file", ""),
    ("array.jsonl", "file", ":2"),
    ("random.dat", "folder", ""),
    ("utf16.txt", "glob", ""),
    # With a tokenizer given, nothing reads the data before the trainer prepares it.
    ("truncated.jsonl", "folder with a given tokenizer", ":4"),
])
def test_bad_data_exits_non_zero_naming_the_file(workdir, capsys, name, place, line):
    corpus = workdir / "corpus"  # 40 good files, doc00.txt to doc39.txt; a bad one among them sorts after doc20
    bad = workdir / name if place == "file" else corpus / f"doc20-{name}"
    bad.write_bytes(BAD_FILES[name])
    source = {"file": str(bad), "glob": str(corpus / "doc*")}.get(place, str(corpus))
    extra = []
    if place.endswith("given tokenizer"):
        train_tokenizer(["def value(self):\n    return count\n" * 20], 320).save(str(workdir / "tokenizer.json"))
        extra = ["--data.tokenizer", str(workdir / "tokenizer.json")]
    assert_refused_before_training(workdir, capsys, fit_args(workdir, source, *extra), f"{bad}{line}: ")


def test_corpus_smaller_than_one_batch_exits_before_a_zero_step_run(workdir, capsys):
    small = workdir / "small.txt"
    small.write_text("def value(self):\n    return count\n" * 6)  # ~60 tokens: one sequence of 32, batch_size 4
    err = assert_refused_before_training(workdir, capsys, fit_args(workdir, str(small)), str(small))
    assert "smaller than one batch" in err


# ------------------------------------------------------------------------------------------------ token ids


def tiny_model_config(vocab_size: int):
    return get_preset("tiny-moe", vocab_size=vocab_size, d_model=64, n_layers=2, max_seq_len=32)


@pytest.mark.parametrize("init_from,command", [("hf directory", "fit"), ("checkpoint", "fit"),
                                               ("hf directory", "predict")])
def test_init_from_a_model_with_a_smaller_vocabulary_than_the_tokenizer(workdir, tmp_path_factory, capsys, init_from,
                                                                        command):
    # The model's vocab_size comes from init_from, not from the data's tokenizer (320 tokens): ids past the
    # model's embedding must stop the run at setup, not hit an index assert on the device at the first step. In
    # predict no token arrays are read, so the tokenizer's size alone must catch it.
    extra = []
    if init_from == "hf directory":  # and the tokenizer is trained on the corpus
        path = tmp_path_factory.mktemp("init") / "hf"
        save_hf_checkpoint(build_model(tiny_model_config(64)), path)
    else:  # a checkpoint of this project's layout, and a tokenizer given as a file
        path = tmp_path_factory.mktemp("init") / "small-vocab.ckpt"  # outside workdir, which must stay free of them
        model = build_model(tiny_model_config(300))
        torch.save({"model_config": dataclasses.asdict(model.config),
                    "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, path)
        texts = [p.read_text() for p in sorted((workdir / "corpus").iterdir())]
        tokenizer = train_tokenizer(texts, 320)
        assert tokenizer.get_vocab_size() > 300
        tokenizer.save(str(workdir / "tokenizer.json"))
        extra = ["--data.tokenizer", str(workdir / "tokenizer.json")]
    args = fit_args(workdir, str(workdir / "corpus"), "--model.init_from", str(path), *extra)
    assert_refused_before_training(workdir, capsys, [command, *args[1:]], f"--model.init_from={path}")


def test_tokenizer_with_gaps_in_its_ids_sizes_the_model_past_its_largest_id(workdir):
    # A tokenizer.json whose end-of-text token sits beyond its base vocabulary: the model's vocab_size, linked to
    # the data module's, must cover that id, which ends every document.
    spec = json.loads(train_tokenizer(["def value(self):\n    return count\n" * 20], 320).to_str())
    gap_id = len(spec["model"]["vocab"]) + 50
    spec["model"]["vocab"]["<|endoftext|>"] = spec["added_tokens"][0]["id"] = gap_id
    (workdir / "gaps.json").write_text(json.dumps(spec))
    args = tiny_run_args(workdir)
    parsed = cli.build_cli([*args[: args.index("--trainer.max_steps")], "--data.tokenizer", str(workdir / "gaps.json")],
                           run=False)
    parsed.datamodule.setup("fit")
    assert parsed.datamodule.max_token_id() == gap_id < parsed.model.model_config.vocab_size
