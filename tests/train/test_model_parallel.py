"""FSDP2 and tensor parallelism (moe/train/parallel.py) against a single process, on 2 CPU processes (gloo).

The oracle is a single-process fit on the same global batch: under dp=2 each process gets half of it, under tp=2
both processes get all of it. Lightning gives training loaders a shuffling DistributedSampler
over the data-parallel processes, so the oracle reads the rows in the order that sampler deals them.
"""

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch.utils.data import DistributedSampler

sys.path.insert(0, str(Path(__file__).parent))
from launch import free_port
from test_module import PatternData

from moe import get_preset
from moe.model import Block, Transformer
from moe.train import LanguageModel
from moe.train.parallel import check_tensor_parallel, parallelize
from moe.train.strategies import ModelParallelStrategy

SHAPE = dict(vocab_size=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32)
MODELS = {"moe": get_preset("tiny-moe", **SHAPE, ffn_dim=32, n_experts=4, top_k=2, n_shared_experts=1),
          # with Qwen3's per-head QK-norm, whose weight every tensor-parallel process holds whole
          "dense": get_preset("tiny-dense", **SHAPE, ffn_dim=64, qk_norm="head")}
# (data_parallel_size, tensor_parallel_size); fsdp1 is Lightning's FSDPStrategy (torch FSDP1, flat shards).
MODES = {"fsdp2": (2, 1), "tp": (1, 2), "fsdp1": (2, 1)}
CASES = ([(mode, kind, False) for mode in ("fsdp2", "tp") for kind in MODELS]
         + [("fsdp2", "moe", True), ("tp", "dense", True), ("fsdp1", "moe", False)])
STEPS = 4
# AdamW's default eps (1e-8) turns a gradient entry that is zero up to rounding into a full-size update of either
# sign, so the weights of a few near-zero-gradient router entries drift apart by rounding alone; with a larger
# eps such entries move by lr * gradient / eps, and every weight can be compared tightly.
MODULE_KWARGS = dict(warmup_steps=1, eps=1e-4)


class CPUFSDPStrategy(FSDPStrategy):
    """Lightning's FSDPStrategy on CPU processes (gloo). Lightning refuses accelerator='cpu' for that class itself,
    not for subclasses; torch's FSDP1 runs on a CPU. Its precision plugin is the one that refuses norm clipping."""

    def __init__(self):
        super().__init__(sharding_strategy="FULL_SHARD", auto_wrap_policy={Block}, process_group_backend="gloo")

    def _setup_model(self, model):
        from torch.distributed.fsdp import FullyShardedDataParallel

        # Lightning passes device_id=None on a CPU, which FSDP1 takes as "find an accelerator".
        return FullyShardedDataParallel(model, mixed_precision=self.mixed_precision_config,
                                        sharding_strategy=self.sharding_strategy, device_id=torch.device("cpu"),
                                        **self.kwargs)


def run_name(mode: str, kind: str, activation_checkpointing: bool, rank: int) -> str:
    return f"{mode}-{kind}{'-ac' if activation_checkpointing else ''}-rank{rank}.pt"


def fit_kwargs():
    # The gradient norm is about 3: clipping at 1 binds on every step.
    return dict(accelerator="cpu", max_steps=STEPS, precision="32-true", gradient_clip_val=1.0, logger=False,
                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                num_sanity_val_steps=0, limit_val_batches=0)


def tiny_data(batch_size: int, as_sampled_for: int | None = None) -> PatternData:
    """`as_sampled_for=dp`: the rows reordered so that batch k holds what Lightning's shuffling
    DistributedSampler (seed PL_GLOBAL_SEED=0) deals the dp data-parallel processes in step k, batch_size / dp
    rows each, process 0's first."""
    data = PatternData(batch_size=batch_size)
    if as_sampled_for:
        n, dp = len(data.tokens), as_sampled_for
        per_process = [list(DistributedSampler(range(n), num_replicas=dp, rank=r, shuffle=True, seed=0))
                       for r in range(dp)]
        order = torch.tensor(per_process).view(dp, -1, batch_size // dp).transpose(0, 1).reshape(n)
        data.tokens = data.tokens[order]
    return data


def single_process(kind: str, mode: str) -> tuple[torch.Tensor, dict[str, torch.Tensor], float]:
    """(steps,) losses, final weights and last gradient norm of one process fitting each step's global batch:
    the batches the data-parallel processes get, concatenated."""
    from model_parallel_worker import instrument

    dp, _ = MODES[mode]
    module = LanguageModel(MODELS[kind], **MODULE_KWARGS)
    losses = instrument(module)
    trainer = pl.Trainer(devices=1, **fit_kwargs())
    trainer.fit(module, datamodule=tiny_data(batch_size=8, as_sampled_for=dp))
    weights = {name: p.detach() for name, p in module.model.named_parameters()}
    return torch.tensor(losses), weights, float(trainer.callback_metrics["train/grad_norm"])


@pytest.fixture(scope="module")
def parallel_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("model_parallel")
    port = free_port()
    worker = Path(__file__).parent / "model_parallel_worker.py"
    base = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            "WORLD_SIZE": "2", "NODE_RANK": "0", "PL_GLOBAL_SEED": "0"}
    procs = [subprocess.Popen([sys.executable, str(worker), str(out)], cwd=out, env={**base, "LOCAL_RANK": str(r),
                              "RANK": str(r)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in range(2)]
    logs = [p.communicate(timeout=300)[0].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)[-5000:]
    return out


@pytest.mark.parametrize(("mode", "kind", "activation_checkpointing"), CASES)
def test_parallel_fit_matches_single_process(parallel_runs, mode, kind, activation_checkpointing):
    """Per-step losses over 4 optimizer steps match a single process on the same global batch, and both
    processes end with the same full weights as it."""
    ranks = [torch.load(parallel_runs / run_name(mode, kind, activation_checkpointing, r)) for r in range(2)]
    expected_losses, expected_weights, expected_grad_norm = single_process(kind, mode)
    # FSDP1 runs bf16-mixed, which it applies by casting the parameters to bf16 for the forward and backward
    # passes, against a float32 reference: close, not equal. The shard norm would be 30% off, unclipped
    # gradients further still.
    rtol, weight_tol = (2e-2, dict(rtol=0.0, atol=2e-3)) if mode == "fsdp1" else (1e-5, dict(rtol=1e-4, atol=1e-5))
    losses = torch.tensor([rank["losses"] for rank in ranks])  # (2, steps)
    if mode in ("fsdp2", "fsdp1"):
        # Each process's loss is that of its half of the batch: their mean is the global batch's loss (the
        # load-balancing loss too, its expert fractions being counted over both processes; moe/losses.py).
        assert not torch.allclose(losses[0], losses[1])
        torch.testing.assert_close(losses.mean(dim=0), expected_losses, rtol=rtol, atol=0)
    else:  # both processes computed the whole batch
        torch.testing.assert_close(losses, expected_losses.expand(2, -1), rtol=rtol, atol=0)
    assert losses[:, -1].mean() < losses[:, 0].mean()  # it trained
    for rank in ranks:  # the norm of the full gradient, not of one process's shard (moe.train.clipping)
        # (A shard's norm would be about 1/sqrt(2) of the whole's: 29% off.)
        assert rank["grad_norm"] == pytest.approx(expected_grad_norm, rel=rtol)
        before, after = rank["norms"]  # each step's, as logged and as the optimizer saw it: clipped at 1
        assert len(after) == STEPS and max(before) > 1.0
        assert after == pytest.approx([min(norm, 1.0) for norm in before], rel=1e-4)
    for rank in ranks:
        assert rank["weights"].keys() == expected_weights.keys()
        for name, weight in rank["weights"].items():
            torch.testing.assert_close(weight, expected_weights[name], **weight_tol, msg=name)
    for name, weight in ranks[0]["weights"].items():
        assert torch.equal(weight, ranks[1]["weights"][name]), name


class FakeMesh:
    """Just enough of a DeviceMesh for the checks that run before any sharding."""

    def __init__(self, dp: int, tp: int):
        self.mesh_dim_names = ("data_parallel", "tensor_parallel")
        self.sizes = {"data_parallel": dp, "tensor_parallel": tp}

    def __getitem__(self, name):
        return SimpleNamespace(size=lambda: self.sizes[name])


@pytest.mark.parametrize(("tp", "overrides", "message"), [
    (3, dict(n_heads=6, d_model=48), "tensor_parallel_size=3 does not divide ModelConfig.n_kv_heads=2"),
    (4, dict(n_heads=6, d_model=48), "tensor_parallel_size=4 does not divide ModelConfig.n_heads=6"),
    (2, dict(ffn_dim=33), "tensor_parallel_size=2 does not divide ModelConfig.ffn_dim=33"),
    # A partly-MoE model's dense layers are split too.
    (2, dict(ffn_dim=33, n_experts=4, top_k=2, expert_ffn_dim=32, first_k_dense=1),
     "tensor_parallel_size=2 does not divide ModelConfig.ffn_dim=33"),
    # OLMoE's QK-norm takes all heads of a token together: it cannot be split over processes.
    (2, dict(qk_norm="full"), "tensor_parallel_size=2 with ModelConfig.qk_norm='full'"),
])
def test_tensor_parallel_size_must_divide_heads_and_ffn_dim(tp, overrides, message):
    config = MODELS["dense"].replace(**overrides, head_dim=None)
    pattern = "ModelParallelStrategy." + message
    with pytest.raises(ValueError, match=pattern.replace(".", r"\.")):
        check_tensor_parallel(config, tp)
    with pytest.raises(ValueError, match=pattern.replace(".", r"\.")):  # parallelize checks before sharding
        parallelize(Transformer(config), FakeMesh(1, tp))


def test_moe_expert_width_need_not_divide_tensor_parallel_size():
    check_tensor_parallel(MODELS["moe"].replace(ffn_dim=33, expert_ffn_dim=33), 2)  # experts stay whole


def test_tensor_parallel_size_must_divide_devices():
    strategy = ModelParallelStrategy(tensor_parallel_size=3)
    strategy.parallel_devices = [torch.device("cpu")] * 4
    with pytest.raises(ValueError, match=r"ModelParallelStrategy\.tensor_parallel_size=3 does not divide "
                                         r"the 4 devices"):
        strategy.setup_environment()


def test_strategy_configs_parse():
    import yaml

    root = Path(__file__).parents[2] / "configs" / "strategy"
    for name, tp, ep in (("fsdp2.yaml", 1, None), ("fsdp2-tp.yaml", 2, None), ("fsdp2-ep.yaml", 1, 2),
                         ("fsdp2-ep-tp.yaml", 2, 2)):
        strategy = yaml.safe_load((root / name).read_text())["trainer"]["strategy"]
        assert strategy["class_path"] == "moe.train.strategies.ModelParallelStrategy"
        expected = {"data_parallel_size": "auto", "tensor_parallel_size": tp}
        assert strategy["init_args"] == (expected if ep is None else {**expected, "expert_parallel_size": ep})
