"""The command line: LightningCLI fit / validate / test / predict on a tiny corpus, config composition, links,
and the errors a typo in a config produces."""

import csv
import json
import os
import random
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

import cli
from eval import evaluate
from moe.train.checkpoint import load_lightning_checkpoint

ROOT = Path(__file__).parent.parent
# ../shared/evaldata beside the repository (the workspace layout); $MOE_EVAL_DATA where a clone lives elsewhere.
EVALDATA = next((Path(p) for p in (os.environ.get("MOE_EVAL_DATA"), ROOT.parent / "shared" / "evaldata",
                                   "/work/shared/evaldata") if p and Path(p).is_dir()), None)
needs_evaldata = pytest.mark.skipif(EVALDATA is None, reason="no ../shared/evaldata and no $MOE_EVAL_DATA")
QUICKSTART = ["--config", str(ROOT / "configs/model/tiny-moe.yaml"), "--config", str(ROOT / "configs/data/stdlib.yaml"),
              "--config", str(ROOT / "configs/trainer/cpu.yaml"), "--config",
              str(ROOT / "configs/experiment/quickstart.yaml")]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["cli.py"])
    monkeypatch.setenv("MOE_CACHE_DIR", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rng = random.Random(0)
    words = ["def", "return", "class", "import", "self", "value", "index", "count", "items", "print", "if", "else", "for", "while", "in", "not"]
    for i in range(40):
        lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 9))) for _ in range(30)]
        (corpus / f"doc{i:02d}.txt").write_text("\n".join(lines) + "\n")
    # A later --config replaces the experiment's callback list: checkpoint every 3 steps instead of 100.
    experiment = yaml.safe_load((ROOT / "configs/experiment/quickstart.yaml").read_text())
    callbacks = experiment["trainer"]["callbacks"]
    callbacks[0]["init_args"]["every_n_train_steps"] = 3
    (tmp_path / "tiny-callbacks.yaml").write_text(yaml.safe_dump({"trainer": {"callbacks": callbacks}}))
    return tmp_path


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


def test_print_config_composes_files_and_links_values(workdir, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["fit", *QUICKSTART, "--model.config.max_seq_len", "128", "--print_config"])
    assert exit_.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["config"]["n_experts"] == 8  # from the model file
    assert printed["data"]["sources"][0]["path"] == "stdlib"  # from the data file
    assert printed["trainer"]["precision"] == "32-true"  # from the trainer file
    assert printed["trainer"]["max_steps"] == 400  # from the experiment file
    assert printed["trainer"]["gradient_clip_val"] == 1.0  # the LLaMA recipe's default
    assert printed["model"]["lr"] == 0.003 and printed["model"]["betas"] == [0.9, 0.95]
    assert printed["model"]["weight_decay"] == 0.1 and printed["model"]["min_lr_ratio"] == 0.1
    # Linked values are not settable, so they are not printed either.
    assert "seq_len" not in printed["data"] and "vocab_size" not in printed["model"]["config"]


def test_linked_values_reach_the_instances(workdir):
    args = tiny_run_args(workdir)
    parsed = cli.build_cli(args[: args.index("--trainer.max_steps")], run=False)
    assert parsed.datamodule.seq_len == parsed.model.model_config.max_seq_len == 32
    assert parsed.model.model_config.vocab_size == parsed.datamodule.n_vocab
    assert parsed.model.model_config.vocab_size != 4096  # the preset file's value was replaced by the link


@pytest.mark.parametrize("extra", sorted(str(p.relative_to(ROOT)) for folder in ("data", "trainer", "eval")
                                   for p in (ROOT / "configs" / folder).glob("*.yaml")))
def test_every_config_file_composes(workdir, capsys, extra):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["fit", *QUICKSTART, "--config", str(ROOT / extra), "--print_config"])
    assert exit_.value.code == 0
    assert_contains(yaml.safe_load(capsys.readouterr().out), yaml.safe_load((ROOT / extra).read_text()), extra)


def assert_contains(printed, given, where: str) -> None:
    """Every value the file sets is in the composed config (which adds defaults around them)."""
    if isinstance(given, dict):
        for key, value in given.items():
            assert_contains(printed[key], value, f"{where}.{key}")
    elif isinstance(given, list) and given and isinstance(given[0], dict):
        assert len(printed) == len(given), where
        for i, (p, g) in enumerate(zip(printed, given)):
            assert_contains(p, g, f"{where}[{i}]")
    else:
        assert printed == given, where


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


def test_unknown_key_in_a_config_file_is_named(workdir, capsys):
    bad = workdir / "bad.yaml"
    bad.write_text("model:\n  config:\n    n_expertz: 4\n")
    with pytest.raises(SystemExit) as exit_:
        cli.main(["fit", *QUICKSTART, "--config", str(bad), "--print_config"])
    assert exit_.value.code not in (0, None)
    assert "n_expertz" in capsys.readouterr().err


@needs_evaldata
def test_fit_validate_test_predict(workdir, capsys):
    in_loop_eval = ["--config", str(ROOT / "configs/eval/zero-shot.yaml"), "--eval.tasks", "[arc_easy, winogrande]",
                    "--eval.limit", "8", "--eval.data_dir", str(EVALDATA), "--eval.at_validation", "false",
                    "--eval.every_n_steps", "3"]
    cli.main(["fit", *tiny_run_args(workdir), *in_loop_eval])
    out = capsys.readouterr().out
    assert "sample after 6 steps" in out and "unigram baseline" in out
    run = workdir / "runs" / "quickstart" / "version_0"
    checkpoints = run / "checkpoints"
    assert (checkpoints / "last.ckpt").is_file()
    assert (run / "tokenizer.json").is_file() and (run / "config.yaml").is_file()
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    train_losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(train_losses) == 3
    assert any(r.get("val/loss") for r in rows) and any(r.get("perf/tokens_per_s") for r in rows)
    # In-loop zero-shot evaluation at steps 3 and 6, logged and appended to the run's JSON lines.
    assert len([r for r in rows if r.get("eval/arc_easy/acc_norm")]) == 2
    assert "zero-shot (train, step 3)" in out
    records = [json.loads(line) for line in (run / "zero_shot.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [3, 6] and records[0]["results"]["winogrande"]["n"] == 8
    # The vocabulary size was linked from the trained tokenizer.
    checkpoint = torch.load(checkpoints / "last.ckpt", weights_only=False)
    tokenizer = Tokenizer.from_file(str(run / "tokenizer.json"))
    assert checkpoint["model_config"]["vocab_size"] == tokenizer.get_vocab_size() < 4096
    assert checkpoint["tokenizer"] == tokenizer.to_str()

    ckpt = str(checkpoints / "last.ckpt")
    for command in ("validate", "test"):
        cli.main([command, *tiny_run_args(workdir), "--ckpt_path", ckpt])
        assert f"{'val' if command == 'validate' else 'test'}/loss" in capsys.readouterr().out

    # Evaluation-only run: the same scores as eval.evaluate on the checkpoint's model and tokenizer.
    cli.main(["validate", *tiny_run_args(workdir), "--ckpt_path", ckpt, "--config",
              str(ROOT / "configs/eval/zero-shot.yaml"), "--eval.tasks", "[arc_challenge, boolq]", "--eval.limit", "10",
              "--eval.data_dir", str(EVALDATA)])
    out = capsys.readouterr().out
    assert "zero-shot (validate" in out and "eval/arc_challenge/acc_norm" in out
    model, tokenizer = load_lightning_checkpoint(ckpt)
    expected = evaluate(model, tokenizer, ["arc_challenge", "boolq"], data_dir=EVALDATA, limit=10)
    record = json.loads((workdir / "runs/quickstart/version_3/zero_shot.jsonl").read_text().splitlines()[-1])
    assert record["stage"] == "validate" and record["results"] == expected
    cli.main(["predict", *tiny_run_args(workdir), "--ckpt_path", ckpt])
    assert "----- 'def ' -----" in capsys.readouterr().out

    # Export: transformers loads the directory and computes the checkpoint's logits with its tokenizer.
    cli.main(["export", ckpt, str(workdir / "hf")])
    hf_model = AutoModelForCausalLM.from_pretrained(workdir / "hf")
    hf_tokenizer = AutoTokenizer.from_pretrained(workdir / "hf")
    model, tokenizer = load_lightning_checkpoint(ckpt)
    text = "def value(self):\n    return count"
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert hf_tokenizer.encode(text) == ids
    with torch.no_grad():
        torch.testing.assert_close(hf_model(torch.tensor([ids])).logits, model(torch.tensor([ids])).logits,
                                   rtol=1e-4, atol=1e-4)


def test_export_errors_name_the_file(workdir, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["export", str(workdir / "missing.ckpt"), str(workdir / "out")])
    assert exit_.value.code == 2 and "missing.ckpt" in capsys.readouterr().err
    assert not (workdir / "out").exists()


def test_presets_command(workdir, capsys):
    cli.main(["presets"])
    out = capsys.readouterr().out
    assert "mixtral-8x7b" in out and "46.7B" in out and "12.9B" in out


def test_help_documents_model_fields_and_module_arguments(workdir, capsys):
    with pytest.raises(SystemExit):
        cli.main(["fit", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "Width of the residual stream (HF: hidden_size)." in out  # a ModelConfig field docstring
    assert "Peak learning rate." in out  # LanguageModel's docstring
    assert "Tokens per training sequence." in out  # TextDataModule's docstring
