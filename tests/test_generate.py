"""moe.generate against independent oracles: greedy decoding against recomputing the whole sequence without a
cache at every step, HF transformers' own `generate` on exported checkpoints, the logit filters against a
brute-force ranking written here in Python floats, and sampling frequencies against softmax(logits / t).

Shapes: B batch, T prompt length, V vocabulary, n generated tokens.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from moe.config import ModelConfig
from moe.generate import filter_logits, generate, sample_next
from moe.hf import save_hf_checkpoint
from moe.kv_cache import KVCache
from moe.model import Transformer, build_model

from .tiny_models import V, randomize, tiny


def prompt(batch: int = 2, length: int = 10, vocab: int = V, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def greedy_without_cache(model, input_ids: torch.Tensor, n: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Oracle: each step runs the whole sequence so far through the model, no cache. -> (B, T + n) tokens and
    the n next-token logits (B, V) that chose them."""
    tokens, step_logits = input_ids, []
    for _ in range(n):
        logits = model(tokens).logits[:, -1]
        step_logits.append(logits)
        tokens = torch.cat((tokens, logits.argmax(-1, keepdim=True)), dim=1)
    return tokens, step_logits


@torch.no_grad()
def cached_step_logits(model, tokens: torch.Tensor, prompt_len: int) -> list[torch.Tensor]:
    """Next-token logits of every step when `tokens` (B, T + n) is fed as a prefill of the prompt followed by
    one-token decodes through a cache."""
    cache = KVCache.for_model(model, tokens.shape[0], tokens.shape[1])
    logits = [model(tokens[:, :prompt_len], cache=cache).logits[:, -1]]
    for t in range(prompt_len, tokens.shape[1] - 1):
        logits.append(model(tokens[:, t:t + 1], cache=cache).logits[:, -1])
    return logits


MOE = {"n_experts": 4, "top_k": 2, "expert_ffn_dim": 32}
# name: (preset or config overrides, prompt length, new tokens)
GREEDY_CASES = {
    "dense_mha": (tiny(n_kv_heads=4), 10, 12),
    "dense_gqa": (tiny(), 10, 12),
    "dense_mqa_tied": (tiny(n_kv_heads=1, tie_embeddings=True, attn_bias=True), 10, 12),
    "layer_windows": (tiny(n_layers=3, layer_windows=[3, None, 5]), 10, 12),
    # 10 + 14 tokens through a 4-slot rolling buffer: it wraps round six times.
    "window_wraps": (tiny(sliding_window=4), 10, 14),
    "window_eager": (tiny(sliding_window=4, attention_backend="eager"), 10, 14),
    "moe_window": (tiny(**MOE, sliding_window=3, n_kv_heads=1), 10, 12),
    # 10 + 12 tokens against max_seq_len = 16: only the prompt is held to it; RoPE and the cache go on past it.
    "past_max_seq_len": (tiny(max_seq_len=16, layer_windows=[4, None]), 10, 12),
    "tiny_moe_grouped": ("grouped", 8, 8),
    "tiny_moe_loop": ("loop", 8, 8),
}


def greedy_case(name: str):
    config, prompt_len, n = GREEDY_CASES[name]
    if isinstance(config, str):  # the tiny-moe preset with that expert backend
        model = randomize(build_model("tiny-moe", expert_backend=config))
    else:
        model = randomize(Transformer(config))
    return model, prompt(2, prompt_len, model.config.vocab_size), n


@pytest.mark.parametrize("name", GREEDY_CASES)
def test_greedy_generation_matches_recomputation_without_cache(name):
    model, input_ids, n = greedy_case(name)
    expected, expected_logits = greedy_without_cache(model, input_ids, n)
    torch.testing.assert_close(generate(model, input_ids, n, temperature=0), expected, rtol=0, atol=0)
    for step, (ours, theirs) in enumerate(zip(cached_step_logits(model, expected, input_ids.shape[1]),
                                              expected_logits, strict=True)):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5, msg=lambda m, s=step: f"step {s}: {m}")


@pytest.mark.parametrize("chunks", [[3, 7], [4, 1, 5], [2, 2, 2, 2, 2]])
@torch.no_grad()
def test_chunked_prefill_matches_single_prefill(chunks):
    model = randomize(Transformer(tiny(**MOE, sliding_window=3)))
    tokens = prompt(2, 16)
    single = KVCache.for_model(model, 2, 16)
    expected = [model(tokens[:, :10], cache=single).logits]
    chunked = KVCache.for_model(model, 2, 16)
    pieces, start = [], 0
    for T in chunks:
        pieces.append(model(tokens[:, start:start + T], cache=chunked).logits)
        start += T
    ours = [torch.cat(pieces, dim=1)]
    for t in range(10, 16):  # decoding on from either cache gives the same logits too
        expected.append(model(tokens[:, t:t + 1], cache=single).logits)
        ours.append(model(tokens[:, t:t + 1], cache=chunked).logits)
    torch.testing.assert_close(torch.cat(ours, dim=1), torch.cat(expected, dim=1), rtol=0, atol=1e-5)


@pytest.mark.parametrize("capacity_factor", [0.25, 1.0])
def test_capacity_factor_decodes_dropless(capacity_factor):
    # A capacity drops assignments depending on the other tokens of the forward pass; dropless, each row's
    # continuation is that of the same weights with no capacity, recomputed whole at every step.
    model = randomize(Transformer(tiny(**MOE, capacity_factor=capacity_factor)))
    dropless = randomize(Transformer(tiny(**MOE)))
    input_ids = prompt(2, 10)
    expected, _ = greedy_without_cache(dropless, input_ids, 12)
    torch.testing.assert_close(generate(model, input_ids, 12, temperature=0), expected, rtol=0, atol=0)
    assert all(layer.mlp.capacity_factor == capacity_factor for layer in model.layers)  # given back


def test_generation_runs_compiled_blocks_eagerly():
    # The training module's compile=True compiles each block; generating must neither compile graphs for the
    # cached forward nor change what it produces.
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    model, input_ids, n = greedy_case("layer_windows")
    expected = generate(model, input_ids, n, temperature=0)
    for block in model.layers:
        block.compile(backend=counting_backend)
    model.train()
    model(input_ids).logits.sum().backward()  # the training graph
    compiled = len(graphs)
    assert compiled > 0
    torch.testing.assert_close(generate(model, input_ids, n, temperature=0), expected, rtol=0, atol=0)
    model(input_ids).logits.sum().backward()
    assert len(graphs) == compiled and model.training


# ---------------------------------------------------------------------------------------------------- HF
HF_DIMS = {"vocab_size": 96, "d_model": 32, "n_layers": 3, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 64,
           "max_seq_len": 64}
HF_CASES = {
    "mistral_window4": {"sliding_window": 4},  # a prompt of 6 and 14 new tokens: the window binds throughout
    "mixtral": {"n_experts": 4, "top_k": 2, "expert_ffn_dim": 48, "expert_backend": "grouped"},
}


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("name", HF_CASES)
def test_greedy_generation_matches_hf(name, attn, tmp_path):
    ours = randomize(Transformer(ModelConfig(**HF_DIMS, **HF_CASES[name])))
    save_hf_checkpoint(ours, tmp_path)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=attn, dtype=torch.float32).eval()
    input_ids, n = prompt(2, 6, vocab=96), 14
    out = theirs.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                          max_new_tokens=n, min_new_tokens=n, pad_token_id=0, output_logits=True,
                          return_dict_in_generate=True)
    torch.testing.assert_close(generate(ours, input_ids, n, temperature=0), out.sequences, rtol=0, atol=0)
    for ours_logits, hf_logits in zip(cached_step_logits(ours, out.sequences, 6), out.logits, strict=True):
        torch.testing.assert_close(ours_logits, hf_logits, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------------- eos
def truncated_at_eos(tokens: torch.Tensor, prompt_len: int, eos_id: int, n: int) -> torch.Tensor:
    """What generate should return given the oracle's uninterrupted tokens: every row's continuation up to its
    first eos_id, then eos_id; cut after the step at which the last row finished."""
    rows, finish_steps = [], []
    for row in tokens[:, prompt_len:].tolist():
        first = row.index(eos_id) if eos_id in row else n
        finish_steps.append(first + 1)
        rows.append(row[:first + 1] + [eos_id] * (n - first - 1))
    new = torch.tensor(rows)[:, :min(max(finish_steps), n)]
    return torch.cat((tokens[:, :prompt_len], new), dim=1)


@pytest.mark.parametrize("rows_finishing", ["one", "all"])
def test_eos_pads_finished_rows_and_stops_early(rows_finishing):
    model, input_ids, n = greedy_case("dense_gqa")
    T = input_ids.shape[1]
    expected, _ = greedy_without_cache(model, input_ids, n)
    if rows_finishing == "all":  # a single row, finishing at its fourth token: generation stops there
        input_ids, expected = input_ids[:1], expected[:1]
        eos_id = expected[0, T + 3].item()
        want = truncated_at_eos(expected, T, eos_id, n)
        assert want.shape[1] == T + 4 - (eos_id in expected[0, T:T + 3])
    else:  # the first row finishes at its third token; this seed's second row never emits that token
        eos_id = expected[0, T + 2].item()
        assert eos_id not in expected[1, T:]
        want = truncated_at_eos(expected, T, eos_id, n)
        assert want.shape[1] == T + n and (want[0, T + 2:] == eos_id).all()
    torch.testing.assert_close(generate(model, input_ids, n, temperature=0, eos_id=eos_id), want, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------- filters
def brute_force_filter(logits: list[float], top_k: int | None, top_p: float | None) -> set[int]:
    """Token indices kept: rank by logit (ties: lower index first), keep the first top_k, then renormalise
    and keep tokens while the probability ranked above them is below top_p."""
    ranking = sorted(range(len(logits)), key=lambda i: (-logits[i], i))
    if top_k is not None:
        ranking = ranking[:top_k]
    if top_p is None:
        return set(ranking)
    weights = [math.exp(logits[i] - logits[ranking[0]]) for i in ranking]
    kept, mass = set(), 0.0
    for i, w in zip(ranking, weights):
        if mass >= top_p:
            break
        kept.add(i)
        mass += w / sum(weights)
    return kept


TOP_KS = [None, 1, 3, 10, 12, 50]  # vocabulary of 12 below
TOP_PS = [None, 0.01, 0.3, 0.75, 0.95, 1.0]


@pytest.mark.parametrize("top_p", TOP_PS)
@pytest.mark.parametrize("top_k", TOP_KS)
def test_filter_logits_matches_brute_force(top_k, top_p):
    gen = torch.Generator().manual_seed(0)
    # Rounded to one decimal in a narrow range, so most rows contain ties, often across the top-k / top-p edge.
    logits = (torch.randn(64, 12, generator=gen) * 0.6).round(decimals=1)
    logits[0] = torch.tensor([30.0] + [0.0] * 11)  # p = 1 must keep even tokens of probability ~1e-13
    # Four tokens of probability exactly 1/4: p = 0.75 is reached exactly by three, which must then suffice.
    logits[1] = torch.tensor([0.0] * 4 + [float("-inf")] * 8)
    filtered = filter_logits(logits, top_k, top_p)
    for row, out in zip(logits.tolist(), filtered):
        kept = {i for i in brute_force_filter(row, top_k, top_p) if row[i] > -math.inf}
        assert set(torch.nonzero(torch.isfinite(out)).flatten().tolist()) == kept
        assert all(out[i] == row[i] for i in kept)  # kept logits are untouched


def test_filter_logits_with_neither_filter_is_identity():
    logits = torch.randn(3, 7)
    assert filter_logits(logits) is logits


# ---------------------------------------------------------------------------------------------------- sampling
def test_sampling_is_reproducible_with_a_seeded_generator():
    model, input_ids, n = greedy_case("moe_window")

    def sample(seed: int) -> torch.Tensor:
        return generate(model, input_ids, n, temperature=1.5, top_p=0.95, generator=torch.Generator().manual_seed(seed))

    first, second, other = sample(0), sample(0), sample(1)
    assert torch.equal(first, second)
    assert not torch.equal(first, other)  # the seed does reach the draws


def test_top_k_one_is_greedy():
    model, input_ids, n = greedy_case("window_wraps")
    greedy = generate(model, input_ids, n, temperature=0)
    sampled = generate(model, input_ids, n, temperature=2.0, top_k=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sampled, greedy)
    ties = torch.tensor([[0.0, 3.0, 3.0, 1.0], [5.0, 5.0, 5.0, 5.0]])  # ties go to the lower index, as argmax
    assert sample_next(ties, 1.0, top_k=1).tolist() == ties.argmax(-1).tolist() == [1, 0]


FREQUENCY_CASES = {
    # name: (temperature, top_k, top_p, tokens the filters keep)
    "t=1": (1.0, None, None, [0, 1, 2, 3, 4]),
    "t=0.5": (0.5, None, None, [0, 1, 2, 3, 4]),
    "t=2": (2.0, None, None, [0, 1, 2, 3, 4]),
    "t=0.7,top_k=3": (0.7, 3, None, [0, 1, 4]),
    # At t=1 the probabilities are about (0.12, 0.33, 0.05, 0.07, 0.43): 0.43 < 0.6 <= 0.43 + 0.33.
    "t=1,top_p=0.6": (1.0, None, 0.6, [1, 4]),
    # The nucleus is taken after tempering: at t=1 these p would keep [1, 4] in both cases. At t=0.5 the top
    # token alone has 0.58 >= 0.5; at t=2 the cumulative mass runs 0.32, 0.60, 0.77, so p = 0.7 keeps three.
    "t=0.5,top_p=0.5": (0.5, None, 0.5, [4]),
    "t=2,top_p=0.7": (2.0, None, 0.7, [0, 1, 4]),
}


@pytest.mark.parametrize("name", FREQUENCY_CASES)
def test_sampling_frequencies_match_tempered_softmax(name):
    temperature, top_k, top_p, kept = FREQUENCY_CASES[name]
    logits = torch.tensor([0.0, 1.0, -1.0, -0.5, 1.25])
    expected = torch.zeros(5)
    expected[kept] = (logits[kept] / temperature).softmax(-1)
    draws = 40_000
    tokens = sample_next(logits.expand(draws, 5), temperature, top_k, top_p, torch.Generator().manual_seed(0))
    frequencies = torch.bincount(tokens, minlength=5) / draws
    # Standard error of a frequency is at most sqrt(0.25 / 40000) = 0.0025; allow four of them.
    torch.testing.assert_close(frequencies, expected, rtol=0, atol=0.01)


# ---------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": 0}, "top_k"),
        ({"max_new_tokens": -1}, "max_new_tokens"),
        ({"input_ids": torch.zeros(1, 65, dtype=torch.long)}, "input_ids"),  # max_seq_len is 64
        ({"input_ids": torch.zeros(4, dtype=torch.long)}, "input_ids"),
    ],
)
def test_bad_arguments_raise_naming_them(kwargs, name):
    model = build_model(tiny())
    arguments = {"input_ids": prompt(1, 4), "max_new_tokens": 2, **kwargs}
    with pytest.raises(ValueError, match=name):
        generate(model, **arguments)
    if name in ("temperature", "top_p", "top_k"):
        with pytest.raises(ValueError, match=name):
            sample_next(torch.zeros(1, V), **kwargs)
        if name != "temperature":
            with pytest.raises(ValueError, match=name):
                filter_logits(torch.zeros(1, V), **kwargs)


def test_generate_keeps_the_models_mode_and_handles_zero_new_tokens():
    model = build_model(tiny()).train()
    input_ids = prompt(2, 5)
    assert torch.equal(generate(model, input_ids, 0), input_ids)
    out = generate(model, input_ids, 3, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 8) and torch.equal(out[:, :5], input_ids)
    assert model.training
