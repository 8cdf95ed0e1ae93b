"""The command line: LightningCLI fit / validate / test / predict on a tiny corpus, config composition and links.
The errors a bad flag, config file, data file or checkpoint produces are in tests/test_cli_errors.py."""

import csv
import json

import pytest
import torch
import yaml
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

import cli
from eval import evaluate
from moe.train.checkpoint import load_lightning_checkpoint

from .cli_runs import EVALDATA, QUICKSTART, ROOT, needs_evaldata, tiny_run_args


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

    # Evaluation-only run, 2-shot, on a shipped task, MMLU's STEM group (a stratified subsample: one item of each
    # of its 19 subjects) and a user's task file: the same scores as eval.evaluate on the checkpoint's model.
    user_task = workdir / "my_boolq.yaml"
    user_task.write_text("task: my_boolq\ndataset_path: google/boolq\nvalidation_split: validation\n"
                         "output_type: multiple_choice\ndoc_to_text: \"{{passage}}\\nQuestion: {{question}}?\\nAnswer:\"\n"
                         "doc_to_choice: ['no', 'yes']\ndoc_to_target: '{{answer | int}}'\n")
    tasks = ["arc_challenge", "mmlu_stem", str(user_task)]
    (EVALDATA_COPY := workdir / "evaldata").mkdir()
    (EVALDATA_COPY / "my_boolq").symlink_to(EVALDATA / "boolq")
    for name in ("arc_challenge", "mmlu"):
        (EVALDATA_COPY / name).symlink_to(EVALDATA / name)
    cli.main(["validate", *tiny_run_args(workdir), "--ckpt_path", ckpt, "--config",
              str(ROOT / "configs/eval/zero-shot.yaml"), "--eval.tasks", f"[{', '.join(tasks)}]", "--eval.limit", "10",
              "--eval.num_fewshot", "2", "--eval.group_limit", "19", "--eval.data_dir", str(EVALDATA_COPY),
              "--eval.routing", "true"])
    out = capsys.readouterr().out
    assert "zero-shot (validate" in out and "2-shot" in out and "eval/mmlu_stem/acc" in out
    model, tokenizer = load_lightning_checkpoint(ckpt)
    expected = evaluate(model, tokenizer, tasks, data_dir=EVALDATA_COPY, limit=10, num_fewshot=2, group_limit=19)
    record = json.loads((run / "validate/version_1/zero_shot.jsonl").read_text().splitlines()[-1])
    assert record["stage"] == "validate" and json.dumps(record["results"]) == json.dumps(expected)  # nan-safe
    assert expected["mmlu_stem"]["n"] == 19 and expected["my_boolq"]["n"] == 10
    # --eval.routing: routing.jsonl (the reference's lines, task null, then every task's) and one heatmap beside
    # zero_shot.jsonl, counting the tokens eval.routing counts on the checkpoint's model.
    from eval.routing import RoutingRecorder

    with RoutingRecorder(model) as recorder:
        evaluate(model, tokenizer, tasks, data_dir=EVALDATA_COPY, limit=10, num_fewshot=2, group_limit=19,
                 routing=recorder)
    lines = [json.loads(line) for line in (run / "validate/version_1/routing.jsonl").read_text().splitlines()]
    tokens = {line["task"]: line["tokens"] for line in lines if line["stage"] == "validate"}
    assert tokens.pop(None) > 0 and tokens == {task: int(n) for task, n in zip(recorder.tasks, recorder.sums().tokens)}
    assert len(list((run / "validate/version_1").glob("routing_validate_step*.png"))) == 1
    cli.main(["predict", *tiny_run_args(workdir), "--ckpt_path", ckpt])
    assert "----- 'def ' -----" in capsys.readouterr().out
    assert (run / "predict/version_0/predictions.jsonl").is_file()  # each command in the checkpoint's run

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


def test_presets_command(workdir, capsys):
    cli.main(["presets"])
    out = capsys.readouterr().out
    assert "mixtral-8x7b" in out and "46.7B" in out and "12.9B" in out
    lines = out.splitlines()
    assert len({len(line) for line in lines[2:]}) == 1  # columns aligned, the longest name included
    assert any(line.startswith("qwen1.5-moe-a2.7b ") and line.endswith("14.3B    2.69B") for line in lines)


def test_help_documents_model_fields_and_module_arguments(workdir, capsys):
    with pytest.raises(SystemExit):
        cli.main(["fit", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "Width of the residual stream (HF: hidden_size)." in out  # a ModelConfig field docstring
    assert "Peak learning rate." in out  # LanguageModel's docstring
    assert "Tokens per training sequence." in out  # TextDataModule's docstring


def test_a_model_with_dense_first_layers_trains_logs_its_moe_layers_and_exports(workdir):
    """DeepSeek-style first_k_dense through the real commands: expert load is logged under the MoE layer's own index,
    and the export (a Qwen2-MoE directory, with mlp_only_layers) gives HF's logits equal to ours."""
    cli.main(["fit", *tiny_run_args(workdir), "--model.config.first_k_dense", "1", "--trainer.max_steps", "4",
              "--trainer.val_check_interval", "4"])
    run = workdir / "runs" / "quickstart" / "version_0"
    columns = next(csv.reader((run / "metrics.csv").open()))
    assert "experts/layer_1/max_over_mean" in columns and not [c for c in columns if "layer_0" in c]
    cli.main(["export", str(run / "checkpoints/last.ckpt"), str(workdir / "hf")])
    ours, _ = load_lightning_checkpoint(run / "checkpoints/last.ckpt")
    assert not ours.config.is_moe_layer(0) and ours.config.is_moe_layer(1)
    hf = AutoModelForCausalLM.from_pretrained(workdir / "hf", torch_dtype=torch.float32).eval()
    ids = torch.randint(0, ours.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours.eval()(ids).logits, rtol=1e-4, atol=1e-4)
