"""moe.planning (`moe plan`) against published figures and against measurement on CPU.

Published figures, each with its tolerance:
- LLaMA-65B (Touvron et al. 2023, section 2.4): 1.4T tokens at about 380 tokens/s/GPU on 2048 A100-80GB take
  "approximately 21 days"; the planner, given that throughput (or the MFU it implies), within 2%.
- Chinchilla (Hoffmann et al. 2022) Table 3, approach 1's compute-optimal sizes: the 20-tokens-per-parameter rule
  within 5% in parameters and 8% in tokens on every row; approach 3's closed form against a numerical minimisation
  of its own fitted loss, and its exponents against Table 2 (0.46 / 0.54, to 0.01).
- Kaplan et al. 2020 Table 6: N_opt = 1.3e9 parameters at 1 PF-day, growing as C^0.73.
- Llama 3 405B (Dubey et al. 2024): 3.8e25 FLOPs = 6 x 405B x 15.6T tokens, within 1%.
- ZeRO (Rajbhandari et al. 2020): mixed-precision AdamW holds 16 bytes per parameter; ZeRO-3 over 64 GPUs 16/64.
Measured on CPU (tiny models built with moe.build_model):
- weights, gradients and AdamW state after one real step: exact (moments), 0.1% (with AdamW's step counters);
- activations: the bytes saved for backward (saved-tensor hooks) within 0.5%, in float32, bf16 and bf16 autocast,
  for dense, MoE, gated shared experts, interleaved MoE layers, LayerNorm with q/k/v bias, QK-norm (Qwen3, OLMoE)
  and norms on the sublayers' outputs (OLMo 3, and an MoE model with them);
  what the forward pass leaves alive (torch.profiler's memory events), with and without activation checkpointing,
  and the forward pass's peak without, within 2.5%; the whole step's peak between the estimated activations and those plus every
  gradient (2.5% either side).
"""

import gc
import json
import math
import re

import pytest
import torch
import yaml

import cli
from moe import ModelConfig, build_model, get_preset
from moe.linear_cross_entropy import CPU_CHUNK_ELEMENTS
from moe.planning import load_model_config, make_plan, scaling
from moe.planning.activations import activation_bytes
from moe.planning.memory import STRATEGIES, ParamSplit, strategy_memory
from moe.planning.report import format_plan

GIB = 2**30
STRATEGY = {s.name: s for s in STRATEGIES}

# ---------------------------------------------------------------------------------------------- time and FLOPs


def test_llama_65b_takes_about_21_days_on_2048_a100s():
    plan = make_plan("llama-65b", tokens=1.4e12, gpu="a100-80gb", n_gpus=2048, tokens_per_gpu_s=380)
    assert plan.days == pytest.approx(21, rel=0.02)
    assert plan.mfu == pytest.approx(0.49, abs=0.01)  # what 380 tokens/s/GPU is, by the PaLM count
    again = make_plan("llama-65b", tokens=1.4e12, gpu="a100-80gb", n_gpus=2048, mfu=plan.mfu)
    assert again.days == pytest.approx(plan.days, rel=1e-9)
    assert again.gpu_hours == pytest.approx(2048 * 24 * again.days, rel=1e-9)


LLAMA_3_405B = {  # meta-llama/Llama-3.1-405B config.json, without its rope_scaling (which the planner does not use)
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 16384, "intermediate_size": 53248,
    "num_hidden_layers": 126, "num_attention_heads": 128, "num_key_value_heads": 8, "vocab_size": 128256,
    "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "max_position_embeddings": 8192, "tie_word_embeddings": False,
}


def test_llama_3_405b_budget_from_an_hf_directory(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_3_405B))
    plan = make_plan(str(tmp_path), tokens=15.6e12, gpu="h100-80gb", n_gpus=16384)
    assert plan.params_total == pytest.approx(405e9, rel=0.01)
    assert plan.flops_6n == pytest.approx(3.8e25, rel=0.01)
    # The PaLM count adds attention (8% at 8192 tokens), so 3.8e25 FLOPs buy that much fewer tokens.
    by_flops = make_plan(str(tmp_path), flops=3.8e25, gpu="h100-80gb", n_gpus=16384)
    assert by_flops.tokens == pytest.approx(15.6e12, rel=0.10)
    assert by_flops.tokens == pytest.approx(3.8e25 / by_flops.flops_per_token)


# --------------------------------------------------------------------------------------------- scaling laws

# Hoffmann et al. 2022, Table 3: parameters, FLOPs, tokens (approach 1)
CHINCHILLA_TABLE_3 = [(400e6, 1.92e19, 8.0e9), (1e9, 1.21e20, 20.2e9), (10e9, 1.23e22, 205.1e9),
                      (67e9, 5.76e23, 1.5e12), (175e9, 3.85e24, 3.7e12), (280e9, 9.90e24, 5.9e12),
                      (520e9, 3.43e25, 11.0e12), (1e12, 1.27e26, 21.2e12), (10e12, 1.30e28, 216.2e12)]


@pytest.mark.parametrize("params,flops,tokens", CHINCHILLA_TABLE_3)
def test_chinchilla_table_3(params, flops, tokens):
    rule = scaling.chinchilla_20_tokens(flops)
    assert rule.params == pytest.approx(params, rel=0.05)
    assert rule.tokens == pytest.approx(tokens, rel=0.08)
    # Approach 3 with the published (rounded) constants puts fewer parameters on more tokens: 0.30-0.77 of
    # Table 3's sizes, the gap growing with compute as C^(a - 1/2).
    approach_3 = scaling.chinchilla_optimal(flops)
    assert 0.29 < approach_3.params / params < 0.78
    assert 6 * approach_3.params * approach_3.tokens == pytest.approx(flops, rel=1e-9)


@pytest.mark.parametrize("flops", [1e19, 5.76e23, 1e26])
def test_chinchilla_approach_3_closed_form_minimises_its_loss(flops):
    optimum = scaling.chinchilla_optimal(flops)
    # Golden-section search of L(N, C / 6N) over log N: an oracle independent of the closed form.
    lo, hi = math.log(1e6), math.log(1e14)
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(200):
        a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        if scaling.chinchilla_loss(math.exp(a), flops / (6 * math.exp(a))) < \
                scaling.chinchilla_loss(math.exp(b), flops / (6 * math.exp(b))):
            hi = b
        else:
            lo = a
    assert math.exp(lo) == pytest.approx(optimum.params, rel=1e-3)
    exponent_n, exponent_d, _ = scaling.chinchilla_exponents()
    assert exponent_n == pytest.approx(0.46, abs=0.01) and exponent_d == pytest.approx(0.54, abs=0.01)  # Table 2


def test_kaplan_table_6_allocation_and_equations():
    assert scaling.kaplan_optimal(scaling.PF_DAY).params == pytest.approx(1.3e9)
    assert scaling.kaplan_optimal(10 * scaling.PF_DAY).params / 1.3e9 == pytest.approx(10**0.73)
    # Each of equations 1.1-1.3 is 1 nat at its scale constant.
    assert scaling.kaplan_loss_n(8.8e13) == scaling.kaplan_loss_d(5.4e13) == 1.0
    assert scaling.kaplan_loss_c(3.1e8 * scaling.PF_DAY) == pytest.approx(1.0)


def test_the_laws_inverted_for_a_model_size_give_back_its_tokens():
    n, d = 67e9, scaling.chinchilla_optimal(5.76e23)
    tokens = scaling.optimal_tokens_for_size(d.params, d.params)
    assert tokens["Chinchilla approach 3"] == pytest.approx(d.tokens, rel=1e-9)
    assert tokens["Chinchilla ~20 tokens/param"] == 20 * d.params
    kaplan = scaling.kaplan_optimal(1e22)
    assert scaling.optimal_tokens_for_size(n, kaplan.params)["Kaplan et al. 2020"] == pytest.approx(kaplan.tokens)


# ------------------------------------------------------------------------------------------ memory: states


def test_mixed_precision_adamw_is_16_bytes_per_parameter_and_zero_3_divides_by_the_gpus():
    config = get_preset("llama-7b")
    params = config.num_params()
    for name in ("ddp", "deepspeed-zero1"):
        one = strategy_memory(config, STRATEGY[name], 1, "bf16-mixed", 2048, 1)
        assert (one.weights + one.gradients + one.optimizer) * GIB == pytest.approx(16 * params)
    zero_3 = strategy_memory(config, STRATEGY["deepspeed-zero3"], 64, "bf16-mixed", 2048, 1)
    assert (zero_3.weights + zero_3.gradients + zero_3.optimizer) * GIB == pytest.approx(16 * params / 64)
    zero_1 = strategy_memory(config, STRATEGY["deepspeed-zero1"], 64, "bf16-mixed", 2048, 1)
    assert zero_1.optimizer * GIB == pytest.approx(12 * params / 64)  # ZeRO paper: 2 + 2 + 12/N
    assert (zero_1.weights + zero_1.gradients) * GIB == pytest.approx(4 * params)
    fsdp2 = strategy_memory(config, STRATEGY["fsdp2"], 64, "bf16-true", 2048, 1)
    assert (fsdp2.weights + fsdp2.gradients + fsdp2.optimizer) * GIB == pytest.approx(8 * params / 64)


def test_tensor_and_expert_parallel_shards_add_up_to_the_model():
    config = get_preset("mixtral-8x7b")
    split = ParamSplit.of(config)
    # Against the parameters of a built model (meta device): the routed experts, and what tensor parallelism splits
    # (attention projections; the dense SwiGLUs, none in Mixtral).
    model = build_model("mixtral-8x7b", device="meta")
    experts = sum(p.numel() for name, p in model.named_parameters() if ".experts." in name)
    tp_split = sum(p.numel() for name, p in model.named_parameters() if re.search(r"self_attn\.[qkvo]_proj", name))
    assert (split.experts, split.tp_split) == (experts, tp_split)
    fsdp2 = strategy_memory(config, STRATEGY["fsdp2"], 8, "32-true", 4096, 1)
    ep = strategy_memory(config, STRATEGY["fsdp2-ep"], 8, "32-true", 4096, 1)
    tp = strategy_memory(config, STRATEGY["fsdp2-tp"], 8, "32-true", 4096, 1)
    assert ep.weights == pytest.approx(fsdp2.weights)  # EP moves where experts live, not how much each GPU keeps
    assert tp.weights * GIB * 8 / 4 == pytest.approx(split.tp_split + 2 * (split.rest + split.experts))
    assert ep.buffers < fsdp2.buffers  # a block gathers E/2 experts


@pytest.mark.parametrize("name", ["tiny-dense", "tiny-moe"])
@pytest.mark.parametrize("precision", ["32-true", "bf16-true"])
def test_states_match_one_real_adamw_step(name, precision):
    torch.manual_seed(0)
    model = build_model(name)
    if precision == "bf16-true":
        model = model.to(torch.bfloat16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters())
    moments = sum(t.numel() * t.element_size() for s in optimizer.state.values() for k, t in s.items() if k != "step")
    state = moments + sum(s["step"].numel() * s["step"].element_size() for s in optimizer.state.values())
    planned = strategy_memory(model.config, STRATEGY["ddp"], 1, precision, 16, 2)
    assert planned.weights * GIB == weights
    assert planned.gradients * GIB == grads
    assert planned.optimizer * GIB == moments
    assert planned.optimizer * GIB == pytest.approx(state, rel=1e-3)


# ----------------------------------------------------------------------------------------- memory: activations


def saved_for_backward(model, ids, autocast: bool) -> int:
    """Bytes of the distinct storages autograd saves for backward, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        model(ids, labels=ids)
    return sum(saved.values())


VARIANTS = [("tiny-dense", {}), ("tiny-moe", {}), ("tiny-moe", dict(n_shared_experts=1, shared_expert_gate=True)),
            ("tiny-moe", dict(moe_every=2, first_k_dense=1)), ("tiny-dense", dict(norm_type="layernorm",
                                                                                   attn_bias=True)),
            ("tiny-qwen3-moe", {}), ("tiny-olmoe", {}), ("tiny-olmo3", {}), ("tiny-moe", dict(norm_position="output"))]


@pytest.mark.parametrize("name,overrides", VARIANTS, ids=lambda v: v if isinstance(v, str) else "-".join(v) or "preset")
@pytest.mark.parametrize("precision", ["32-true", "bf16-true", "bf16-mixed"])
def test_activations_match_the_bytes_saved_for_backward(name, overrides, precision):
    torch.manual_seed(0)
    batch, seq_len = 3, 40
    model = build_model(name, **overrides)
    if precision == "bf16-true":
        model = model.to(torch.bfloat16)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len))
    measured = saved_for_backward(model, ids, autocast=precision == "bf16-mixed")
    planned = strategy_memory(model.config, STRATEGY["ddp"], 1, precision, seq_len, batch)
    estimate = activation_bytes(model.config, seq_len, {"32-true": "fp32", "bf16-true": "bf16"}.get(precision, "mixed"))
    # the saved tensors, plus (bf16-mixed) autocast's bf16 copies of every matmul weight
    assert estimate.kept(batch * seq_len) + planned.weight_copies * GIB == pytest.approx(measured, rel=0.005)
    if precision == "bf16-mixed":
        assert planned.weight_copies > 0


def profile_step(model, ids):
    """(bytes alive after the forward pass, peak during it, peak over the step) from torch.profiler's CPU memory
    events, counting only what the step allocates."""
    from torch.profiler import ProfilerActivity, profile, record_function

    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with record_function("forward"):
            loss = model(ids, labels=ids).loss
        loss.backward()
    events = prof.profiler.kineto_results.events()
    forward_end = max(e.end_ns() for e in events if e.name() == "forward")
    live = forward_peak = peak = 0
    after_forward = None
    for start, nbytes in sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]"):
        if after_forward is None and start > forward_end:
            after_forward = live
        live += nbytes
        peak = max(peak, live)
        if start <= forward_end:
            forward_peak = peak
    return after_forward, forward_peak, peak


@pytest.mark.parametrize("name", ["tiny-dense", "tiny-moe"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["stored", "checkpointed"])
def test_activations_match_the_profiled_memory(name, checkpointing):
    from moe.train.parallel import recompute_blocks

    torch.manual_seed(0)
    batch, seq_len = 4, 128
    model = build_model(name, vocab_size=512)  # a small vocabulary, so that the blocks dominate the loss
    if checkpointing:
        recompute_blocks(model)
    ids = torch.randint(0, 512, (batch, seq_len))
    after_forward, forward_peak, peak = profile_step(model, ids)
    estimate = activation_bytes(model.config, seq_len, "fp32", loss_chunk_elements=CPU_CHUNK_ELEMENTS)
    tokens = batch * seq_len
    assert after_forward == pytest.approx(estimate.kept(tokens, checkpointing), rel=0.025)
    if not checkpointing:  # (checkpointed, the forward pass's peak is one block's transient tensors)
        assert forward_peak == pytest.approx(estimate.kept(tokens) + estimate.loss_buffer(tokens), rel=0.025)
    gradients = sum(p.numel() * 4 for p in model.parameters())
    # The step's peak lies between the activations' and the activations' plus all gradients: in the backward pass
    # the weights' gradients grow while the activations are freed.
    assert 0.975 * estimate.total(tokens, checkpointing) < peak < 1.025 * (estimate.total(tokens, checkpointing)
                                                                         + gradients)


def test_largest_micro_batch_fits_and_one_more_does_not():
    config = get_preset("llama-7b")
    for strategy in ("fsdp2", "deepspeed-zero3"):
        at_max = strategy_memory(config, STRATEGY[strategy], 8, "bf16-mixed", 2048, 1, capacity_gib=79.6)
        for ac, batch in ((False, at_max.max_micro_batch), (True, at_max.max_micro_batch_checkpointed)):
            assert batch >= 1
            fits = strategy_memory(config, STRATEGY[strategy], 8, "bf16-mixed", 2048, batch, capacity_gib=79.6)
            over = strategy_memory(config, STRATEGY[strategy], 8, "bf16-mixed", 2048, batch + 1, capacity_gib=79.6)
            assert (fits.fits_checkpointed if ac else fits.fits) and not (over.fits_checkpointed if ac else over.fits)
        assert at_max.max_micro_batch_checkpointed > at_max.max_micro_batch


# ------------------------------------------------------------------------------------------ inputs and output


def test_model_specs(tmp_path):
    assert load_model_config("configs/model/mixtral-8x7b.yaml") == get_preset("mixtral-8x7b")
    # LightningCLI's spelling of a model config (model.init_args.config) and a YAML without one
    fields = {"d_model": 64, "n_layers": 2, "n_heads": 4, "ffn_dim": 96, "vocab_size": 256}
    (tmp_path / "cli.yaml").write_text(yaml.safe_dump({"model": {"init_args": {"config": fields}}}))
    assert load_model_config(str(tmp_path / "cli.yaml")) == ModelConfig(**fields)
    (tmp_path / "data.yaml").write_text(yaml.safe_dump({"data": {"batch_size": 4}}))
    with pytest.raises(ValueError, match="holds no model config"):
        load_model_config(str(tmp_path / "data.yaml"))
    with pytest.raises(ValueError, match="not a preset"):
        load_model_config("llama-99b")
    with pytest.raises(FileNotFoundError):
        load_model_config(str(tmp_path / "missing.yaml"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model_config(str(tmp_path))


def test_moe_plan_states_the_dense_caveat_and_uses_active_parameters():
    plan = make_plan("mixtral-8x7b", tokens=1e12, n_gpus=8, seq_len=4096)
    assert plan.flops_6n == 6 * get_preset("mixtral-8x7b").num_active_params() * 1e12
    assert any("dense" in note for note in plan.notes)
    assert {m.strategy for m in plan.memory} >= {"fsdp2-ep", "fsdp2-ep-tp"}
    assert "fsdp2-ep" in make_plan("llama-7b", tokens=1e12).not_applicable
    # OLMoE's QK-norm takes all heads together, which training refuses to split by tensor parallelism
    olmoe = make_plan("olmoe-1b-7b", tokens=1e12, n_gpus=8).not_applicable
    assert {"fsdp2-tp", "fsdp2-ep-tp"} <= set(olmoe) and "qk_norm 'full'" in olmoe["fsdp2-tp"]
    text = format_plan(plan)
    assert "FSDP2 + EP 2" in text and "Chinchilla approach 3" in text and "Kaplan" in text


def test_command_prints_a_table_and_json(capsys):
    cli.main(["plan", "tiny-moe", "--tokens", "1e9", "--gpu", "h200", "--gpus", "2"])
    assert "Memory per GPU" in capsys.readouterr().out
    cli.main(["plan", "llama-65b", "--tokens", "1.4T", "--gpu", "a100-80gb", "--gpus", "2048",
              "--tokens-per-gpu-s", "380", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert data["days"] == pytest.approx(20.8, abs=0.1)
    assert len(data["memory"]) + len(data["not_applicable"]) == len(STRATEGIES) and data["memory"]


@pytest.mark.parametrize("args,flag", [
    (["llama-99b", "--tokens", "1e9"], "MODEL"),
    (["configs/model/missing.yaml", "--tokens", "1e9"], "MODEL"),
    (["llama-7b"], "--tokens"),
    (["llama-7b", "--tokens", "1e9", "--flops", "1e20"], "--flops"),
    (["llama-7b", "--tokens", "many"], "--tokens"),
    (["llama-7b", "--tokens", "1e9", "--gpu", "x100"], "--gpu"),
])
def test_bad_input_is_one_line_naming_the_flag(capsys, args, flag):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["plan", *args])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and err.count("\n") == 1
