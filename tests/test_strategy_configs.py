"""configs/strategy/: every file composes with the quickstart, instantiates the strategy it describes (FSDP on CPU;
DeepSpeed where the package is installed), and a GPU-only strategy on a CPU run is refused by name
(moe/train/strategies.py)."""

import importlib.util
from types import SimpleNamespace

import pytest
import torch
import yaml
from jsonargparse import ArgumentParser
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, Strategy
from torch.distributed.fsdp import ShardingStrategy
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

import cli
from moe.errors import InputError
from moe.model import Block
from moe.train.strategies import check_strategy

from .cli_runs import QUICKSTART, ROOT

FILES = sorted(p.name for p in (ROOT / "configs/strategy").glob("*.yaml") if not p.name.startswith("fsdp2"))
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
FSDP_SHARDING = {"fsdp-full.yaml": ShardingStrategy.FULL_SHARD, "fsdp-grad-op.yaml": ShardingStrategy.SHARD_GRAD_OP,
                 "fsdp-hybrid.yaml": ShardingStrategy.HYBRID_SHARD}
ZERO = {"deepspeed-zero1.yaml": (1, False, False), "deepspeed-zero2.yaml": (2, False, False),
        "deepspeed-zero3.yaml": (3, False, False), "deepspeed-zero3-offload.yaml": (3, True, True)}


def test_every_issue_config_is_present():
    assert set(FILES) == {"ddp.yaml", *FSDP_SHARDING, *ZERO}


def composed_strategy(name: str, capsys) -> dict:
    """The trainer.strategy of `fit --print_config` on the quickstart plus this file."""
    with pytest.raises(SystemExit) as exit_:
        cli.main(["fit", *QUICKSTART, "--config", str(ROOT / "configs/strategy" / name), "--print_config"])
    assert exit_.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    given = yaml.safe_load((ROOT / "configs/strategy" / name).read_text())["trainer"]["strategy"]
    assert printed["trainer"]["strategy"]["class_path"] == given["class_path"]
    for key, value in given["init_args"].items():
        assert printed["trainer"]["strategy"]["init_args"][key] == value, key
    assert printed["trainer"]["max_steps"] == 400  # the quickstart's values are still there
    return printed["trainer"]["strategy"]


def instantiate(strategy: dict) -> Strategy:
    """The strategy object, built by jsonargparse as LightningCLI builds Trainer(strategy=...)."""
    parser = ArgumentParser()
    parser.add_argument("--strategy", type=Strategy)
    return parser.instantiate(parser.parse_object({"strategy": strategy})).strategy


@pytest.mark.parametrize("name", FILES)
def test_strategy_config_composes_and_instantiates(workdir, capsys, name):
    first_line = (ROOT / "configs/strategy" / name).read_text().splitlines()[0]
    assert first_line.startswith("# Use "), "the first line says when to use this strategy"
    config = composed_strategy(name, capsys)
    if name.startswith("deepspeed") and not HAS_DEEPSPEED:
        pytest.skip("deepspeed is not installed: the file parses and composes, DeepSpeedStrategy cannot be built")
    strategy = instantiate(config)
    if name == "ddp.yaml":
        assert type(strategy) is DDPStrategy and strategy._ddp_kwargs["gradient_as_bucket_view"] is True
    elif name in FSDP_SHARDING:
        assert type(strategy) is FSDPStrategy
        assert strategy.sharding_strategy == FSDP_SHARDING[name]
        assert strategy._state_dict_type == "sharded"
        for policy in (strategy.kwargs["auto_wrap_policy"], strategy._activation_checkpointing_kwargs["auto_wrap_policy"]):
            assert isinstance(policy, ModuleWrapPolicy) and policy._module_classes == {Block}
    else:
        stage, offload_optimizer, offload_parameters = ZERO[name]
        assert isinstance(strategy, DeepSpeedStrategy)
        assert strategy.config.get("zero_force_ds_cpu_optimizer", True) is not offload_optimizer  # torch's AdamW
        zero = strategy.config["zero_optimization"]
        assert zero["stage"] == stage
        assert ("offload_optimizer" in zero) == offload_optimizer and ("offload_param" in zero) == offload_parameters


GPU_ONLY = [("fsdp", "FSDPStrategy"), ("deepspeed_stage_2", "DeepSpeedStrategy"),
            ({"class_path": "lightning.pytorch.strategies.FSDPStrategy", "init_args": {}}, "FSDPStrategy"),
            ("lightning.pytorch.strategies.DeepSpeedStrategy", "DeepSpeedStrategy")]


@pytest.mark.parametrize("strategy,base", GPU_ONLY)
def test_gpu_only_strategy_on_cpu_is_refused_by_name(strategy, base):
    with pytest.raises(InputError) as error:
        check_strategy(SimpleNamespace(strategy=strategy, accelerator="cpu"))
    message = str(error.value)
    assert "--trainer.strategy" in message and "--trainer.accelerator cpu" in message and base in message
    assert "configs/strategy/ddp.yaml" in message


@pytest.mark.parametrize("accelerator", ["auto", "gpu", "cuda"])
def test_gpu_only_strategy_without_a_gpu_is_refused(monkeypatch, accelerator):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(InputError, match="no CUDA GPU"):
        check_strategy({"strategy": "fsdp", "accelerator": accelerator})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    check_strategy({"strategy": "fsdp", "accelerator": accelerator})  # a GPU run: allowed


@pytest.mark.parametrize("strategy", ["auto", "ddp", None, {"class_path": "lightning.pytorch.strategies.DDPStrategy"},
                                      "no.such.Strategy"])
def test_strategies_that_run_on_cpu_pass(strategy):
    check_strategy({"strategy": strategy, "accelerator": "cpu"})


@pytest.mark.parametrize("name", ["fsdp-full", "deepspeed-zero2"])
def test_command_line_refuses_a_gpu_only_strategy_on_cpu_naming_the_flags(workdir, capsys, name):
    """Before any data is prepared (no tokenizer trained, nothing written): exit 2 naming both flags and the CPU
    alternatives."""
    with pytest.raises(SystemExit) as exit_:
        cli.main(["fit", *QUICKSTART, "--config", str(ROOT / f"configs/strategy/{name}.yaml"),
                  "--trainer.accelerator", "cpu", "--trainer.max_steps", "1"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--trainer.strategy" in err and "--trainer.accelerator" in err and "ddp.yaml" in err
    assert not (workdir / "cache").exists() and not (workdir / "runs").exists()
