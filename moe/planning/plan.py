"""`moe plan`: parameters, FLOPs, compute-optimal allocation, memory per GPU and wall-clock time of a training run,
from a model config and a token or compute budget, without building the model.

FLOPs per token are the PaLM count MFU uses (ModelConfig.flops_per_token: 6 x active non-embedding weights with the
output layer, plus attention's 12 x layers x heads x head_dim x sequence length); time is those FLOPs over the GPUs'
datasheet peak times the MFU. The scaling laws (moe/planning/scaling.py) were fitted with C = 6 N D, so they get
that count: 6 x active parameters x tokens.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from moe.config import ModelConfig
from moe.planning import scaling
from moe.planning.hardware import get_gpu
from moe.planning.memory import PRECISIONS, STRATEGIES, StrategyMemory, applicable, strategy_memory
from moe.presets import PRESETS, get_preset, preset_names


def load_model_config(spec: str | ModelConfig) -> ModelConfig:
    """A preset name, a model YAML (configs/model/*.yaml: the config under model.config), or an HF model directory
    holding config.json."""
    if isinstance(spec, ModelConfig):
        return spec
    if spec in PRESETS:
        return get_preset(spec)
    path = Path(spec)
    if path.is_dir():
        from moe.hf import read_hf_config
        from moe.hf_config import config_from_hf

        return config_from_hf(read_hf_config(path))
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise FileNotFoundError(f"no such model config file: {path}")
        import yaml

        fields = yaml.safe_load(path.read_text()) or {}
        # configs/model/*.yaml and a run's saved config.yaml: model.config; LightningCLI style: model.init_args.config
        for key in ("model", "init_args", "config", "init_args"):
            if isinstance(fields, dict) and isinstance(fields.get(key), dict):
                fields = fields[key]
        if not isinstance(fields, dict) or "d_model" not in fields:
            raise ValueError(f"{path} holds no model config (expected model.config: {{d_model: ..., ...}})")
        try:
            return ModelConfig(**fields)
        except TypeError as error:
            raise ValueError(f"{path}: {error}") from None
    raise ValueError(f"{spec!r} is not a preset ({', '.join(preset_names())}), a model YAML file or an HF model "
                     "directory with config.json")


@dataclass
class Plan:
    """Everything `moe plan` prints; `asdict` gives its JSON."""

    model: str
    is_moe: bool
    params_total: int
    params_active: int
    params_non_embedding: int
    """Active parameters without the token embedding and output layer (Kaplan's N)."""
    seq_len: int
    flops_per_token: float
    """PaLM count: what MFU divides, so what the GPUs must compute."""
    flops_per_token_6n: float
    """6 x active parameters: the scaling laws' convention."""
    tokens: float
    flops: float
    """tokens x flops_per_token."""
    flops_6n: float
    """6 N D: the compute the scaling laws are asked about."""
    tokens_per_param: float
    allocations: list[scaling.Allocation]
    optimal_tokens_for_model: dict[str, float]
    chinchilla_loss: float
    kaplan_loss_n: float
    kaplan_loss_d: float
    gpu: str
    n_gpus: int
    peak_tflops: float
    mfu: float
    mfu_source: str
    seconds: float
    precision: str
    micro_batch: int
    gpu_memory_gib: float
    headroom: float
    memory: list[StrategyMemory] = field(default_factory=list)
    not_applicable: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def days(self) -> float:
        return self.seconds / 86400

    @property
    def gpu_hours(self) -> float:
        return self.seconds / 3600 * self.n_gpus

    def to_dict(self) -> dict:
        return {**asdict(self), "days": self.days, "gpu_hours": self.gpu_hours}


def make_plan(model: str | ModelConfig, tokens: float | None = None, flops: float | None = None,
              gpu: str = "h100-80gb", n_gpus: int = 8, mfu: float | None = None,
              tokens_per_gpu_s: float | None = None, seq_len: int | None = None, precision: str = "bf16-mixed",
              micro_batch: int = 1, headroom: float = 0.1, gpus_per_node: int = 8) -> Plan:
    """Plan training `model` on `tokens` tokens or `flops` FLOPs (PaLM count; exactly one of the two) on n_gpus
    GPUs of type `gpu` at `mfu` (default: the card's recorded MFU, else an assumption), or at a measured
    `tokens_per_gpu_s` (which sets the MFU it implies)."""
    if (tokens is None) == (flops is None):
        raise ValueError("give exactly one budget: tokens or flops")
    if (tokens if tokens is not None else flops) <= 0:
        raise ValueError(f"the budget must be positive, got {tokens if tokens is not None else flops}")
    if n_gpus < 1 or micro_batch < 1:
        raise ValueError(f"n_gpus and micro_batch must be at least 1, got {n_gpus} and {micro_batch}")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; one of {', '.join(PRECISIONS)}")
    if not 0 <= headroom < 1:
        raise ValueError(f"headroom must be in [0, 1), got {headroom}")
    config = load_model_config(model)
    card = get_gpu(gpu)
    seq_len = seq_len or config.max_seq_len
    flops_per_token = config.flops_per_token(seq_len)
    active = config.num_active_params()
    if tokens is None:
        tokens = flops / flops_per_token
    flops = tokens * flops_per_token
    flops_6n = 6 * active * tokens
    non_embedding = active - config.embedding_params()
    peak = card.peak_tflops(precision)
    if tokens_per_gpu_s is not None:
        mfu, source = tokens_per_gpu_s * flops_per_token / (peak * 1e12), f"implied by {tokens_per_gpu_s:g} tokens/s/GPU"
    elif mfu is not None:
        source = "given"
    else:
        mfu, source = card.mfu()
    if not 0 < mfu <= 1:
        raise ValueError(f"MFU must be in (0, 1], got {mfu}")
    plan = Plan(
        model=config.name, is_moe=config.is_moe, params_total=config.num_params(), params_active=active,
        params_non_embedding=non_embedding, seq_len=seq_len, flops_per_token=flops_per_token,
        flops_per_token_6n=6.0 * active, tokens=tokens, flops=flops, flops_6n=flops_6n, tokens_per_param=tokens / active,
        allocations=scaling.optimal_allocations(flops_6n),
        optimal_tokens_for_model=scaling.optimal_tokens_for_size(active, non_embedding),
        chinchilla_loss=scaling.chinchilla_loss(active, tokens), kaplan_loss_n=scaling.kaplan_loss_n(non_embedding),
        kaplan_loss_d=scaling.kaplan_loss_d(tokens), gpu=card.name, n_gpus=n_gpus, peak_tflops=peak, mfu=mfu,
        mfu_source=source, seconds=flops / (n_gpus * peak * 1e12 * mfu), precision=precision,
        micro_batch=micro_batch, gpu_memory_gib=card.memory_gib, headroom=headroom)
    for strategy in STRATEGIES:
        reason = applicable(config, strategy, n_gpus)
        if reason:
            plan.not_applicable[strategy.name] = reason
            continue
        plan.memory.append(strategy_memory(config, strategy, n_gpus, precision, seq_len, micro_batch,
                                           card.memory_gib, headroom, gpus_per_node))
    if config.is_moe:
        plan.notes.append("MoE: the scaling laws were fitted on dense models; they are applied to the active "
                          f"parameters ({active / 1e9:.3g}B of {plan.params_total / 1e9:.3g}B), which set the FLOPs, "
                          "and say nothing of what the inactive experts add. Activations assume balanced routing.")
    return plan
