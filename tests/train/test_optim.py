"""The optimizer: weight-decay groups (matrices decayed; norms, biases and embeddings not), any torch.optim class by
name from Python or the command line, the fused AdamW by default."""

import re

import pytest
import torch

from moe import build_model
from moe.train import LanguageModel
from moe.train.optim import build_optimizer, param_groups


def expected_no_decay(name: str) -> bool:
    # Written from the model's parameter names, independently of the grouping rule.
    return name == "embed_tokens.weight" or "layernorm" in name or name == "norm.weight" or name.endswith(".bias")


@pytest.mark.parametrize("overrides", [
    dict(),
    dict(attn_bias=True, tie_embeddings=True),
    dict(norm_type="layernorm"),
    dict(n_experts=0),
])
def test_weight_decay_groups(overrides):
    model = build_model("tiny-moe", **overrides)
    decay, plain = param_groups(model, weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    not_decayed = {names[id(p)] for p in plain["params"]}
    assert decayed | not_decayed == set(names.values()) and not decayed & not_decayed
    assert not_decayed == {n for n in names.values() if expected_no_decay(n)}
    # The matrices that must be decayed, spelled out.
    assert "layers.0.self_attn.q_proj.weight" in decayed
    assert ("lm_head.weight" in decayed) == (not model.config.tie_embeddings)
    if model.config.is_moe:
        assert {"layers.0.mlp.router.gate.weight", "layers.0.mlp.experts.gate_proj"} <= decayed
    else:
        assert "layers.0.mlp.down_proj.weight" in decayed


def test_another_optimizer_is_chosen_by_name_and_keeps_the_decay_groups():
    from .test_module import TINY, PatternData, trainer

    module = LanguageModel(TINY, warmup_steps=1, optimizer="SGD", optimizer_args={"momentum": 0.9}, lr=0.01)
    t = trainer(max_steps=1, limit_val_batches=0)
    t.fit(module, datamodule=PatternData())
    (optimizer,) = t.optimizers
    assert type(optimizer) is torch.optim.SGD
    assert [g["name"] for g in optimizer.param_groups] == ["decay", "no_decay"]
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
    assert optimizer.param_groups[0]["momentum"] == 0.9 and "betas" not in optimizer.defaults


def test_the_default_is_fused_adamw_with_the_llama_betas():
    optimizer = build_optimizer(torch.nn.Linear(4, 4), "AdamW", 3e-4, 0.1, (0.9, 0.95), 1e-8)
    assert type(optimizer) is torch.optim.AdamW and optimizer.defaults["fused"]
    assert optimizer.defaults["betas"] == (0.9, 0.95) and optimizer.defaults["eps"] == 1e-8


@pytest.mark.parametrize("kwargs,message", [
    (dict(optimizer="Adamw"), "LanguageModel.optimizer='Adamw' is not an optimizer class"),
    (dict(optimizer="torch.nn.Linear"), "LanguageModel.optimizer='torch.nn.Linear' is not an optimizer class"),
])
def test_an_unknown_optimizer_is_refused_naming_the_field(kwargs, message):
    from .test_module import TINY

    with pytest.raises(ValueError, match=re.escape(message)):
        LanguageModel(TINY, **kwargs)


def test_an_argument_the_optimizer_does_not_take_is_refused():
    with pytest.raises(ValueError, match="LanguageModel.optimizer_args: SGD takes no betas_typo"):
        build_optimizer(torch.nn.Linear(4, 4), "SGD", 0.1, 0.1, (0.9, 0.95), 1e-8, {"betas_typo": 1})


def test_the_optimizer_is_chosen_from_the_command_line(workdir):
    import cli

    from ..cli_runs import tiny_run_args

    parsed = cli.build_cli([*tiny_run_args(workdir), "--trainer.max_steps", "2", "--model.optimizer", "torch.optim.SGD",
                            "--model.optimizer_args", '{"momentum": 0.5}'], run=False)
    parsed.trainer.fit(parsed.model, datamodule=parsed.datamodule)
    (optimizer,) = parsed.trainer.optimizers
    assert type(optimizer) is torch.optim.SGD and optimizer.param_groups[0]["momentum"] == 0.5


def test_optimizer_args_may_not_set_what_languagemodel_sets():
    with pytest.raises(ValueError, match="LanguageModel.optimizer_args sets lr, weight_decay: give LanguageModel.lr"):
        build_optimizer(torch.nn.Linear(4, 4), "AdamW", 0.1, 0.1, (0.9, 0.95), 1e-8, {"lr": 0.5, "weight_decay": 0})


def test_lightningclis_own_optimizer_flags_are_not_offered(workdir, capsys):
    """LightningCLI's --optimizer would replace configure_optimizers: no decay groups, no schedule."""
    import cli

    from ..cli_runs import tiny_run_args

    with pytest.raises(SystemExit):
        cli.build_cli([*tiny_run_args(workdir), "--optimizer", "SGD"], run=False)
    assert "--optimizer" in capsys.readouterr().err
