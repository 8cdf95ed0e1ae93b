"""moe.model.Transformer on tiny seeded configs: shapes, backend agreement, parameter counts against the
config's analytic count, meta-device initialisation, a short training run, and causality / window reach.

Shapes: B batch, T time, V vocabulary, L layers, E experts.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moe.config import ModelConfig
from moe.kv_cache import KVCache
from moe.model import Transformer, build_model

from .tiny_models import V, tiny

MOE = {"n_experts": 4, "top_k": 2, "expert_ffn_dim": 32}
CONFIGS = {
    "dense": {},
    "moe": MOE,
    "moe_shared": {**MOE, "n_shared_experts": 1},
    "moe_tied_layernorm": {**MOE, "tie_embeddings": True, "norm_type": "layernorm", "attn_bias": True},
    "dense_tied_nonparam": {"tie_embeddings": True, "norm_type": "layernorm_nonparam", "n_kv_heads": 1},
    # MoE on some layers only (tests/test_layer_pattern.py has the patterns themselves).
    "moe_dense_first": {**MOE, "first_k_dense": 1},
    "moe_every_2nd_gated_shared": {**MOE, "moe_every": 2, "n_shared_experts": 1, "shared_expert_gate": True},
    # Norms on the sublayers' outputs (OLMo 2, and OLMo 3 with a window), dense and MoE.
    "dense_output_norms": {"norm_position": "output", "qk_norm": "full", "sliding_window": 5},
    "moe_output_norms": {**MOE, "norm_position": "output"},
}


def build(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return build_model(tiny(**overrides))


def ids(batch: int = 2, seq_len: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (batch, seq_len), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_shapes(name):
    model = build(**CONFIGS[name])
    out = model(ids(2, 12))
    assert out.logits.shape == (2, 12, V)
    assert torch.isfinite(out.logits).all()
    if model.config.is_moe:
        n_moe = len(model.config.moe_layer_indices())  # one entry per MoE layer, none for dense layers
        assert len(out.moe) == n_moe == (1 if name.startswith(("moe_dense", "moe_every")) else 2)
        assert out.tokens_per_expert.shape == (n_moe, 4)
        assert (out.tokens_per_expert.sum(-1) == 2 * 12 * 2).all()
        assert out.aux_loss.shape == out.z_loss.shape == ()
        assert all(logits.shape == (24, 4) for logits in out.router_logits)
    else:
        assert out.moe == [] and out.aux_loss is None and out.z_loss is None and out.tokens_per_expert is None


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parameter_count_matches_config(name):
    model = build(**CONFIGS[name])
    assert model.num_params() == model.config.num_params()
    assert (model.lm_head is None) == model.config.tie_embeddings


def test_tied_model_reuses_embedding_for_output():
    model = build(tie_embeddings=True)
    x = ids()
    with torch.no_grad():
        out = model(x).logits
        h = model.embed_tokens(x)
        cos, sin = model.rotary(torch.arange(x.shape[1]))
        for block in model.layers:
            h, _ = block(h, cos, sin)
        torch.testing.assert_close(out, model.norm(h) @ model.embed_tokens.weight.T)


def loss_of(out, targets: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    loss = F.cross_entropy(out.logits.flatten(0, 1), targets.flatten())
    if out.moe:
        loss = loss + config.aux_loss_coef * out.aux_loss + config.z_loss_coef * out.z_loss
    return loss


@pytest.mark.parametrize("extra", [{}, {"n_shared_experts": 1, "capacity_factor": 1.0}])
def test_loop_and_grouped_backends_agree(extra):
    models = {b: build(**MOE, **extra, expert_backend=b) for b in ("loop", "grouped")}
    models["grouped"].load_state_dict(models["loop"].state_dict())
    x, y = ids(seed=1), ids(seed=2)
    results = {}
    for b, model in models.items():
        out = model(x)
        loss_of(out, y, model.config).backward()
        results[b] = (out.logits, {n: p.grad for n, p in model.named_parameters()})
    torch.testing.assert_close(results["grouped"][0], results["loop"][0], atol=1e-5, rtol=1e-5)
    for n, g in results["grouped"][1].items():
        assert g is not None, n
        torch.testing.assert_close(g, results["loop"][1][n], atol=1e-5, rtol=1e-4, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("name", ["dense", "moe_tied_layernorm"])
def test_meta_device_then_to_empty_and_reset(name):
    reference = build(**CONFIGS[name])
    model = build_model(tiny(**CONFIGS[name]), device="meta")
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    with torch.no_grad():  # stand-in for uninitialised memory, so the test cannot pass by luck
        for t in list(model.parameters()) + list(model.buffers()):
            t.fill_(float("nan"))
    model.reset_parameters()
    torch.testing.assert_close(model.rotary.inv_freq, reference.rotary.inv_freq)
    for (n, p), (_, p_ref) in zip(model.named_parameters(), reference.named_parameters()):
        assert torch.isfinite(p).all(), n
        assert abs(p.std().item() - p_ref.std().item()) < 0.05 + 0.5 * p_ref.std().item(), n  # same init scheme
    assert torch.isfinite(model(ids()).logits).all()


@pytest.mark.parametrize("name", ["dense", "moe_shared", "moe_tied_layernorm", "dense_output_norms",
                                  "moe_output_norms"])
def test_initialisation_scheme(name):
    # Normal(0, init_std), except projections into the residual stream: init_std / sqrt(2L), unless a norm follows
    # them (norm_position 'output', OLMo 2's init). Norms start at one, biases at zero.
    model = build(**CONFIGS[name], d_model=64, init_std=0.05, n_layers=8)
    residual_std = 0.05 if model.config.norm_position == "output" else 0.05 / 4
    for n, p in model.named_parameters():
        if n.endswith("bias"):
            assert torch.count_nonzero(p) == 0, n
        elif "layernorm" in n or n.startswith("norm.") or n.endswith(("q_norm.weight", "k_norm.weight")):
            assert torch.equal(p, torch.ones_like(p)), n
        else:
            expected = residual_std if n.endswith(("o_proj.weight", "down_proj.weight", "down_proj")) else 0.05
            assert p.std().item() == pytest.approx(expected, rel=0.15), n


def test_training_lowers_loss():
    model = build(**MOE, expert_backend="grouped", n_shared_experts=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    x = ids(4, 16, seed=3)
    inputs, targets = x[:, :-1], x[:, 1:]
    losses = []
    for _ in range(30):
        loss = loss_of(model(inputs), targets, model.config)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 1.0, losses


CAUSAL_CASES = [(window, backend) for window in (None, 3) for backend in ("eager", "sdpa", "flex")]


@pytest.mark.parametrize("moe", [False, True])
@pytest.mark.parametrize("window,backend", CAUSAL_CASES)
def test_future_tokens_do_not_change_earlier_logits(window, backend, moe):
    model = build(sliding_window=window, attention_backend=backend, **(MOE if moe else {}))
    x = ids(1, 14, seed=4)
    changed = x.clone()
    changed[0, 9] = (x[0, 9] + 1) % V
    with torch.no_grad():
        a, b = model(x).logits, model(changed).logits
    torch.testing.assert_close(a[0, :9], b[0, :9], atol=1e-6, rtol=0)
    assert (a[0, 9:] - b[0, 9:]).abs().amax(-1).min() > 1e-4  # the change does reach the later positions


@pytest.mark.parametrize("backend", ["eager", "sdpa", "flex"])
@pytest.mark.parametrize("window", [1, 4])
def test_window_limits_reach_in_one_layer(window, backend):
    model = build(n_layers=1, sliding_window=window, attention_backend=backend, **MOE)
    position = 3
    x = ids(1, 14, seed=5)
    changed = x.clone()
    changed[0, position] = (x[0, position] + 1) % V
    with torch.no_grad():
        diff = (model(x).logits - model(changed).logits)[0].abs().amax(-1)  # (T,)
    seen = [t for t in range(14) if diff[t] > 1e-5]
    assert seen == list(range(position, position + window))


def test_layer_windows_compose_reach():
    # Receptive field of a stack is the sum of the per-layer reaches: (3 - 1) + (1 - 1) + (2 - 1) = 3 back.
    model = build(n_layers=3, layer_windows=[3, 1, 2], attention_backend="eager")
    x = ids(1, 12, seed=6)
    changed = x.clone()
    changed[0, 2] = (x[0, 2] + 1) % V
    with torch.no_grad():
        diff = (model(x).logits - model(changed).logits)[0].abs().amax(-1)
    assert [t for t in range(12) if diff[t] > 1e-5] == [2, 3, 4, 5]


def test_logits_at_selects_positions_of_the_full_output():
    torch.manual_seed(0)
    model = build_model("tiny-moe", n_layers=2, expert_backend="loop")
    ids = torch.randint(0, 4096, (3, 9))
    mask = torch.zeros(3, 9, dtype=torch.bool)
    mask[0, [2, 8]] = True
    mask[2, 0] = True
    full = model(ids).logits
    selected = model(ids, logits_at=mask).logits
    assert selected.shape == (3, 4096)
    torch.testing.assert_close(selected, full[mask])


@pytest.mark.parametrize("name", list(CONFIGS))
def test_lengths_run_real_tokens_only_and_padding_changes_nothing(name):
    """Right-padded rows with their lengths (moe/unpadded.py): each row's real positions get the logits of the row
    run alone, whatever the padding holds; the MoE layers route the real tokens only; logits_at and the last
    block trimmed to it select the same logits; logits_at on padding is an error."""
    model = build(**CONFIGS[name])
    x, lengths = ids(4, 10, seed=3), torch.tensor([10, 4, 0, 7])
    other = x.clone()
    other[torch.arange(10) >= lengths[:, None]] = 1  # different padding
    with torch.no_grad():
        out, out_other = model(x, lengths=lengths), model(other, lengths=lengths)
        for b, n in enumerate(lengths.tolist()):
            if n:  # row 2 is all padding
                torch.testing.assert_close(out.logits[b, :n], model(x[b:b + 1, :n]).logits[0], atol=1e-5, rtol=0)
                assert torch.equal(out.logits[b, :n], out_other.logits[b, :n])
        if model.config.is_moe:
            assert (out.tokens_per_expert.sum(-1) == 2 * 21).all()
        mask = torch.zeros(4, 10, dtype=torch.bool)
        mask[0, [3, 9]] = mask[1, 3] = mask[3, 0] = True
        reference = model(x, logits_at=mask).logits
        for options in ({"lengths": lengths}, {"lengths": lengths, "trim_last_block": True},
                        {"trim_last_block": True}):
            torch.testing.assert_close(model(x, logits_at=mask, **options).logits, reference, atol=1e-5, rtol=0)
        mask[1, 4] = True
        with pytest.raises(ValueError, match="logits_at selects padding"):
            model(x, logits_at=mask, lengths=lengths)


def test_lengths_with_a_cache_keep_padding_out_of_later_tokens():
    """Padding written to the cache (zero keys and values) sits after its row's real tokens: no real token of
    this pass or a later one attends to it, so a right-padded chunk continues each row as it would alone."""
    model = build(**MOE)
    x, lengths = ids(3, 12, seed=8), torch.tensor([5, 2, 0])
    with torch.no_grad():
        cache = KVCache.for_model(model, 3, 20)
        model(x[:, :6], cache=cache)
        chunk = model(x[:, 6:], cache=cache, lengths=lengths).logits
        for b, n in enumerate(lengths.tolist()):  # row 2's chunk is all padding
            alone = model(x[b:b + 1, :6 + n]).logits[0, 6:]
            torch.testing.assert_close(chunk[b, :n], alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["moe", "moe_shared", "moe_dense_first"])
def test_training_forward_is_the_plain_composition_of_its_blocks(name):
    """Training (no lengths, no cache, gradients on) runs every block on the whole (B, T) batch: the loss and the
    logits equal, bit for bit, the plain composition embed -> blocks -> norm -> head. Guards the training path
    against the evaluation-only paths (unpadding, trimming the last block)."""
    model = build(**CONFIGS[name]).train()
    x = ids(2, 12, seed=9)
    cos, sin = model.rotary(torch.arange(12))
    h = model.embed_tokens(x)
    for block in model.layers:
        if model.config.norm_position == "output":  # OLMo 2: x + norm(attention(x)), then x + norm(mlp(x))
            h = h + block.post_attention_layernorm(block.self_attn(h, cos, sin))
            out = block.mlp(h)
            h = h + block.post_feedforward_layernorm(out[0] if isinstance(out, tuple) else out)
            continue
        h = h + block.self_attn(block.input_layernorm(h), cos, sin)
        out = block.mlp(block.post_attention_layernorm(h))
        h = h + (out[0] if isinstance(out, tuple) else out)
    expected = F.linear(model.norm(h), model.lm_head.weight)
    logits = model(x).logits
    assert logits.requires_grad and torch.equal(logits, expected)
    labels = ids(2, 12, seed=10)
    loss = model(x, labels=labels).loss
    torch.testing.assert_close(loss, F.cross_entropy(expected.flatten(0, 1), labels.flatten()), atol=1e-6, rtol=0)
