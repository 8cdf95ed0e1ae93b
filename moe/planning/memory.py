"""Memory per GPU of a training run under each shipped strategy (configs/strategy/*.yaml): weights, gradients,
optimizer state, the strategy's working buffers and activations, and the largest micro-batch that fits a GPU.

Bytes per parameter before sharding (ZeRO, Rajbhandari et al. 2020, section 3.1: mixed-precision Adam holds 16):
- torch strategies (DDP, FSDPStrategy, FSDP2): '32-true' and 'bf16-mixed' keep float32 weights (4), gradients (4)
  and AdamW's two moments (8): 16. Autocast makes bf16 copies of the weights as it runs, and each matmul keeps its
  copy for the backward pass (2 bytes per matmul parameter of every block, one block with activation
  checkpointing). Lightning's FSDPStrategy gathers bf16 weights under bf16-mixed (its MixedPrecision policy), so
  there the gathered block is the copy; this project's FSDP2 sets no MixedPrecisionPolicy and gathers float32.
  'bf16-true': bf16 weights, gradients and moments (torch's AdamW keeps its state in the parameters' dtype): 8.
- DeepSpeed: bf16 weights (2) and gradients (2), and in the optimizer float32 master weights and moments (12): 16,
  the ZeRO paper's split; DeepSpeed casts the model to bf16, so its activations are bf16 throughout.
Sharding: ZeRO-1 the optimizer state, ZeRO-2 also the gradients, ZeRO-3 (FSDP FULL_SHARD, FSDP2) also the
weights, over all GPUs (FSDP HYBRID_SHARD: over one node's). ZeRO-3 offload keeps weights and optimizer in host
memory (reported apart). Tensor parallelism (size tp) splits attention and dense SwiGLU weights before FSDP2
shards over the tp-times-smaller data-parallel group; expert parallelism (size ep) splits the routed experts, which
FSDP2 then shards over the ep-times-smaller group holding the same experts (docs/distributed.md).
Working buffers: a ZeRO-3 strategy gathers the root's weights (embedding, output layer: FSDP never reshards the
root) plus two blocks at a time (the one computing and the one prefetched) and holds one block's unsharded
gradient before its reduce-scatter; FSDP SHARD_GRAD_OP keeps every block gathered from forward to backward;
DeepSpeed ZeRO-1/2 hold a reduce and an all-gather bucket (Lightning's defaults, 2e8 elements each).
Not counted: the CUDA context and NCCL buffers, allocator fragmentation (the `headroom` fraction of the GPU is
left for them), temporaries inside a kernel, and routing imbalance (an expert receiving more than its share).
"""

from __future__ import annotations

from dataclasses import dataclass

from moe.config import ModelConfig
from moe.planning.activations import activation_bytes

PRECISIONS = ("bf16-mixed", "bf16-true", "32-true")
DEEPSPEED_BUCKET = 2e8  # Lightning DeepSpeedStrategy's reduce_bucket_size and allgather_bucket_size


@dataclass(frozen=True)
class Strategy:
    name: str
    """The configs/strategy file's stem."""
    label: str
    family: str
    """'ddp', 'fsdp1' (Lightning's FSDPStrategy), 'fsdp2' (ModelParallelStrategy) or 'deepspeed'."""
    stage: int
    """ZeRO stage: 0 nothing sharded, 1 optimizer state, 2 + gradients, 3 + weights."""
    offload: bool = False
    tp: int = 1
    ep: int = 1
    per_node: bool = False
    """Shard within a node only (HYBRID_SHARD)."""
    checkpointing: bool = False
    """Whether the shipped config recomputes every block (FSDPStrategy's activation_checkpointing_policy)."""


STRATEGIES: list[Strategy] = [
    Strategy("ddp", "DDP", "ddp", 0),
    Strategy("deepspeed-zero1", "DeepSpeed ZeRO-1", "deepspeed", 1),
    Strategy("deepspeed-zero2", "DeepSpeed ZeRO-2", "deepspeed", 2),
    Strategy("fsdp-grad-op", "FSDP SHARD_GRAD_OP (ZeRO-2)", "fsdp1", 2, checkpointing=True),
    Strategy("fsdp-full", "FSDP FULL_SHARD (ZeRO-3)", "fsdp1", 3, checkpointing=True),
    Strategy("fsdp-hybrid", "FSDP HYBRID_SHARD", "fsdp1", 3, per_node=True, checkpointing=True),
    Strategy("deepspeed-zero3", "DeepSpeed ZeRO-3", "deepspeed", 3),
    Strategy("deepspeed-zero3-offload", "DeepSpeed ZeRO-3 offload", "deepspeed", 3, offload=True),
    Strategy("fsdp2", "FSDP2", "fsdp2", 3),
    Strategy("fsdp2-tp", "FSDP2 + TP 2", "fsdp2", 3, tp=2),
    Strategy("fsdp2-ep", "FSDP2 + EP 2", "fsdp2", 3, ep=2),
    Strategy("fsdp2-ep-tp", "FSDP2 + EP 2 + TP 2", "fsdp2", 3, tp=2, ep=2),
]


def state_bytes(family: str, precision: str) -> tuple[int, int, int]:
    """(weights, gradients, optimizer state) bytes per parameter before sharding."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; one of {PRECISIONS}")
    if precision == "32-true":
        return 4, 4, 8
    if family == "deepspeed":
        return 2, 2, 12
    return (4, 4, 8) if precision == "bf16-mixed" else (2, 2, 4)


def activation_regime(family: str, precision: str) -> str:
    if precision == "32-true":
        return "fp32"
    return "mixed" if precision == "bf16-mixed" and family != "deepspeed" else "bf16"


@dataclass(frozen=True)
class ParamSplit:
    """Parameters by how tensor and expert parallelism place them."""

    tp_split: int  # attention projections and dense SwiGLUs: split over tensor parallelism
    experts: int  # routed experts: split over expert parallelism
    rest: int  # embeddings, norms, routers, shared experts, output layer: replicated
    root: int  # what FSDP's root unit holds: embedding, final norm, output layer
    block_matmul: list[tuple[int, int, int]]  # per block: (tp_split, experts, other) matmul weights

    @classmethod
    def of(cls, config: ModelConfig) -> ParamSplit:
        blocks = []
        for i in range(config.n_layers):
            if config.is_moe_layer(i):
                experts = config.n_experts * config.expert_params()
                other = config.moe_ffn_params() - experts
                blocks.append((config.attention_params(), experts, other))
            else:
                blocks.append((config.attention_params() + config.dense_ffn_params(), 0, 0))
        tp_split = sum(b[0] for b in blocks)
        experts = sum(b[1] for b in blocks)
        root = config.embedding_params() + config._norm_params()
        return cls(tp_split, experts, config.num_params() - tp_split - experts, root, blocks)

    def block(self, i: int, tp: int, ep: int) -> float:
        """Matmul parameters of block i one GPU computes with (its TP and EP share), norms aside."""
        tp_split, experts, other = self.block_matmul[i]
        return tp_split / tp + experts / ep + other


@dataclass
class StrategyMemory:
    """GiB per GPU under one strategy; activations for the micro-batch asked about."""

    strategy: str
    label: str
    weights: float
    gradients: float
    optimizer: float
    buffers: float
    """Gathered weights, unsharded gradients and buckets."""
    activations: float
    """Saved for backward, autocast's bf16 weight copies included."""
    activations_checkpointed: float
    weight_copies: float
    """Of activations: autocast's bf16 weight copies (every block's)."""
    weight_copies_checkpointed: float
    host: float
    """Host memory per GPU (offload)."""
    checkpointing_default: bool
    fits: bool | None
    fits_checkpointed: bool | None
    max_micro_batch: int
    max_micro_batch_checkpointed: int

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.buffers + self.activations

    @property
    def total_checkpointed(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.buffers + self.activations_checkpointed


def strategy_memory(config: ModelConfig, strategy: Strategy, n_gpus: int, precision: str, seq_len: int,
                    micro_batch: int, capacity_gib: float | None = None, headroom: float = 0.1,
                    gpus_per_node: int = 8) -> StrategyMemory:
    """Memory per GPU of training `config` under `strategy` on n_gpus GPUs, micro_batch sequences of seq_len
    tokens per GPU; with capacity_gib, whether it fits in (1 - headroom) of it and the largest micro-batch that
    does (0 when not even one sequence fits)."""
    w, g, o = state_bytes(strategy.family, precision)
    split = ParamSplit.of(config)
    tp, ep = strategy.tp, strategy.ep
    shards = min(n_gpus, gpus_per_node) if strategy.per_node else n_gpus
    # Each GPU's own parameters before sharding (a TP rank's slice, an EP rank's experts), then its shard of them.
    unsharded = split.tp_split / tp + split.experts / ep + split.rest
    sharded = (split.tp_split + tp * split.rest + tp * split.experts) / shards
    weights = w * (sharded if strategy.stage >= 3 else unsharded)
    gradients = g * (sharded if strategy.stage >= 2 else unsharded)
    optimizer = o * (sharded if strategy.stage >= 1 else unsharded)
    gather = 2 if strategy.family == "fsdp1" and precision != "32-true" else w  # dtype of gathered weights
    blocks = [split.block(i, tp, ep) for i in range(config.n_layers)]  # parameters of each block on one GPU
    largest_block = max(blocks)
    if strategy.stage >= 3:
        buffers = gather * (split.root + 2 * largest_block) + gather * largest_block
    elif strategy.family == "fsdp1":  # SHARD_GRAD_OP: every block stays gathered from forward to backward
        buffers = gather * unsharded + gather * largest_block
    elif strategy.family == "deepspeed":
        buffers = 2 * DEEPSPEED_BUCKET * g
    else:
        buffers = 0.0
    host = 0.0
    if strategy.offload:
        host = (weights + gradients + optimizer) / 2**30
        weights = gradients = optimizer = 0.0
    regime = activation_regime(strategy.family, precision)
    casts = [0.0, 0.0]  # autocast's bf16 weight copies: every block, or the one being recomputed
    if regime == "mixed" and strategy.family != "fsdp1":
        casts = [2 * sum(blocks), 2 * largest_block]
    estimate = activation_bytes(config, seq_len, regime, tp)
    acts = [estimate.total(micro_batch * seq_len, ac) + cast for ac, cast in zip((False, True), casts)]
    states = weights + gradients + optimizer + buffers
    fits, max_batch = [None, None], [0, 0]
    if capacity_gib is not None:
        usable = capacity_gib * 2**30 * (1 - headroom)
        for j, ac in enumerate((False, True)):
            fits[j] = states + acts[j] <= usable
            fixed = states + casts[j]
            max_batch[j] = _largest(lambda b, ac=ac, fixed=fixed: fixed + estimate.total(b * seq_len, ac) <= usable)
    gib = 2**30
    return StrategyMemory(strategy.name, strategy.label, weights / gib, gradients / gib, optimizer / gib,
                          buffers / gib, acts[0] / gib, acts[1] / gib, casts[0] / gib, casts[1] / gib, host,
                          strategy.checkpointing, fits[0], fits[1], max_batch[0], max_batch[1])


def applicable(config: ModelConfig, strategy: Strategy, n_gpus: int) -> str | None:
    """Why a strategy cannot run this model on n_gpus (None when it can), as the shipped config is written."""
    if n_gpus % (strategy.tp * strategy.ep):
        return f"needs a multiple of {strategy.tp * strategy.ep} GPUs"
    if strategy.ep > 1 and (not config.is_moe or config.n_experts % strategy.ep):
        return "no experts to split" if not config.is_moe else f"EP {strategy.ep} does not divide n_experts"
    if strategy.tp > 1 and (config.n_heads % strategy.tp or config.n_kv_heads % strategy.tp):
        return f"TP {strategy.tp} does not divide the heads"
    if strategy.tp > 1 and config.qk_norm == "full":
        return "qk_norm 'full' normalises all heads together: TP cannot split them"
    return None


def _largest(fits, limit: int = 1 << 20) -> int:
    """The largest micro-batch b >= 1 with fits(b) (memory grows with b), 0 when none does."""
    if not fits(1):
        return 0
    low, high = 1, 2
    while high < limit and fits(high):
        low, high = high, 2 * high
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low
