"""Weight-decay groups: matrices decayed; norms, biases and embeddings not."""

import pytest

from moe import build_model
from moe.train.optim import param_groups


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
