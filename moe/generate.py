"""Autoregressive generation with a key/value cache: greedy decoding, temperature, top-k and nucleus (top-p,
Holtzman et al. 2020, "The Curious Case of Neural Text Degeneration") sampling.

The warpers apply in HF transformers' order: logits / temperature, then top-k, then top-p over the
distribution renormalised after top-k. Ties are broken by token index (the lower index ranks first), so
top-k keeps exactly k tokens and top-p keeps exactly the smallest prefix of that ranking whose probability
reaches p.
Shapes: B batch, T prompt length, V vocabulary, n generated tokens.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch

from moe.kv_cache import KVCache
from moe.moe_layer import MoELayer


@dataclass
class Sampling:
    """How `predict` and the end-of-training sample generate text."""

    max_new_tokens: int = 200
    """Tokens generated after each prompt."""
    temperature: float = 0.8
    """Softmax temperature; 0 picks the most likely token (greedy)."""
    top_k: int | None = 50
    """Sample only among the k most likely tokens; None keeps all."""
    top_p: float | None = 0.95
    """Nucleus sampling: the smallest set of tokens whose probability reaches p; None keeps all."""
    seed: int = 0
    """Seed of the sampling generator, so a sample is reproducible."""

    def __post_init__(self) -> None:
        # Written as "not (in range)" so that NaN is refused too.
        checks = (("max_new_tokens", self.max_new_tokens, self.max_new_tokens >= 1, ">= 1"),
                  ("temperature", self.temperature, math.isfinite(self.temperature) and self.temperature >= 0,
                   ">= 0 (0 is greedy)"),
                  ("top_k", self.top_k, self.top_k is None or self.top_k >= 1, ">= 1, or null to keep all tokens"),
                  ("top_p", self.top_p, self.top_p is None or 0 < self.top_p <= 1,
                   "in (0, 1], or null to keep all tokens"))
        for name, value, valid, expected in checks:
            if not valid:
                raise ValueError(f"Sampling.{name}={value} must be {expected}")



def _check_sampling_args(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if not temperature >= 0:  # written so that NaN fails too
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """logits (..., V) with every token outside the top-k, then outside the top-p nucleus, set to -inf."""
    _check_sampling_args(0.0, top_k, top_p)
    k_binds = top_k is not None and top_k < logits.shape[-1]
    # p = 1 keeps every token; skipping it also spares tail tokens that a float32 cumsum reaching 1.0 early
    # would drop.
    p_binds = top_p is not None and top_p < 1
    if not (k_binds or p_binds):
        return logits
    # Stable descending sort: among equal logits the lower token index ranks first.
    sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)  # (..., V)
    keep = torch.ones_like(sorted_logits, dtype=torch.bool)
    if k_binds:
        keep[..., top_k:] = False
        sorted_logits = sorted_logits.masked_fill(~keep, float("-inf"))
    if p_binds:
        probs = sorted_logits.float().softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above each one
        keep &= mass_before < top_p  # the top token has mass_before 0, so at least one token stays
    keep = torch.zeros_like(keep).scatter(-1, order, keep)  # back to vocabulary order
    return logits.masked_fill(~keep, float("-inf"))


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token (B,) from logits (B, V): the argmax when temperature is 0, else a draw from
    softmax(filter_logits(logits / temperature, top_k, top_p))."""
    _check_sampling_args(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(dim=-1)
    filtered = filter_logits(logits.float() / temperature, top_k, top_p)
    return torch.multinomial(filtered.softmax(dim=-1), 1, generator=generator).squeeze(-1)


@contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextmanager
def _dropless(model: torch.nn.Module) -> Iterator[None]:
    """Route every token to all of its top-k experts (no capacity limit) inside the block."""
    limited = [(layer, layer.capacity_factor) for layer in model.modules()
               if isinstance(layer, MoELayer) and layer.capacity_factor is not None]
    for layer, _ in limited:
        layer.capacity_factor = None
    try:
        yield
    finally:
        for layer, capacity_factor in limited:
            layer.capacity_factor = capacity_factor


@contextmanager
def inference_context(model: torch.nn.Module) -> Iterator[None]:
    """How the model runs for generation and scoring: eval mode, dropless routing (a token's output must not
    depend on its batch-mates) and eager execution (compiled blocks would compile a graph for every new prompt
    length and cache layout, and share the recompile limit with training). The model's state is restored."""
    stance = torch.compiler.set_stance("force_eager") if hasattr(torch.compiler, "set_stance") else nullcontext()
    with _eval_mode(model), _dropless(model), stance:
        yield


@torch.inference_mode()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, eos_id: int | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Continue every row of input_ids (B, T) by up to max_new_tokens tokens -> (B, T + n).

    temperature 0 decodes greedily. With eos_id, a row that has produced it keeps emitting eos_id, and
    generation stops early (n < max_new_tokens) once every row has. The prompt is one prefill through a
    cache sized T + max_new_tokens (sliding-window layers keep only their window); the model runs in eval
    mode and gets its previous mode back afterwards. Only the prompt is held to the config's max_seq_len:
    generating past it is allowed, as in HF, though RoPE positions beyond training length may degrade output.

    MoE layers trained with a capacity factor decode dropless: with a capacity, whether a token reaches its
    experts depends on the other tokens of the same forward pass (the rest of the prompt, the other rows of the
    batch), so a row's continuation would change with its batch-mates and a cached decode would not match the
    same sequence run whole. HF export drops the capacity for the same reason.

    The model runs eagerly, even where its blocks were compiled (the training module's compile=True): each
    prompt length, cache layout and window would compile its own graphs of the block, spending minutes and
    the recompile limit that the training graphs share.
    """
    _check_sampling_args(temperature, top_k, top_p)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must have shape (batch, prompt length >= 1), got {tuple(input_ids.shape)}")
    B, T = input_ids.shape
    if T > model.config.max_seq_len:
        raise ValueError(f"input_ids has {T} tokens, longer than the model's max_seq_len={model.config.max_seq_len}")
    if max_new_tokens == 0:
        return input_ids.clone()

    with inference_context(model):
        cache = KVCache.for_model(model, B, T + max_new_tokens)
        logits = model(input_ids, cache=cache).logits[:, -1]  # (B, V)
        finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        tokens = [input_ids]
        for step in range(max_new_tokens):
            next_token = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
            if eos_id is not None:
                next_token = next_token.masked_fill(finished, eos_id)
                finished |= next_token == eos_id
            tokens.append(next_token[:, None])
            if (eos_id is not None and bool(finished.all())) or step == max_new_tokens - 1:
                break
            logits = model(next_token[:, None], cache=cache).logits[:, -1]
        return torch.cat(tokens, dim=1)


def complete(model, prompt_ids: torch.Tensor, sampling: Sampling, eos_id: int | None = None) -> list[int]:
    """The tokens `model` generates after one prompt (n,) or (1, n) with `sampling`'s settings and seed, up to (not
    including) the first EOS."""
    generator = torch.Generator(device=prompt_ids.device).manual_seed(sampling.seed)
    prompt = prompt_ids.view(1, -1)
    out = generate(model, prompt, sampling.max_new_tokens, temperature=sampling.temperature, top_k=sampling.top_k,
                   top_p=sampling.top_p, eos_id=eos_id, generator=generator)
    new = out[0, prompt.shape[1]:].tolist()
    return new[: new.index(eos_id)] if eos_id in new else new
