"""MoE under data parallelism on CPU (gloo), with processes launched by the test itself as an external launcher
would (torchrun, a cluster scheduler): an expert idle on one rank, router losses that do not depend on how the
global batch is split over processes and micro-batches, and a multi-node run simulated on localhost."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from distributed_moe_worker import IDLE, SHORT_RUN, PatternData, fit_run
from launch import free_port
from test_module import TINY

from moe.train import LanguageModel

WORKER = Path(__file__).parent / "distributed_moe_worker.py"


def launch(args: list[str], cwd: Path, multi_node: bool, timeout: float) -> None:
    """Two worker processes, as an external launcher starts them; a run past `timeout` (a hang) fails the test."""
    port, procs = free_port(), []
    for rank in range(2):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "WORLD_SIZE": "2", "NODE_RANK": str(rank if multi_node else 0),
               "LOCAL_RANK": "0" if multi_node else str(rank)}
        log = open(cwd / f"worker{rank}.log", "w")  # noqa: SIM115 (the worker writes to it until it exits)
        procs.append(subprocess.Popen([sys.executable, str(WORKER), *args], cwd=cwd, env=env, stdout=log,
                                      stderr=subprocess.STDOUT))
    try:
        for p in procs:
            p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"distributed run hung (> {timeout} s): {(cwd / 'worker0.log').read_text()[-3000:]}")
    for rank, p in enumerate(procs):
        assert p.returncode == 0, (cwd / f"worker{rank}.log").read_text()[-5000:]


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    """All the 2-process runs of this file's DDP tests, in one launch: name -> [rank 0's record, rank 1's]."""
    out = tmp_path_factory.mktemp("ddp")
    launch(["ddp", str(out)], out, multi_node=False, timeout=120)
    return lambda name: [torch.load(out / f"{name}.rank{r}.pt") for r in range(2)]


def assert_same_weights(a: dict, b: dict, **tol) -> None:
    assert a.keys() == b.keys()
    for name, tensor in a.items():
        torch.testing.assert_close(tensor, b[name], msg=lambda m, name=name: f"{name}: {m}", **tol)


@pytest.mark.parametrize("backend", ["loop", "grouped"])
def test_expert_idle_on_one_rank_neither_hangs_nor_desynchronises(ddp_runs, backend):
    """Rank 0 routes no token to expert IDLE, rank 1 does: every step completes (the launch's timeout), the ranks
    end with the same weights, and the grouped backend's training matches the loop's (the reference)."""
    rank0, rank1 = ddp_runs(f"idle_{backend}")
    for layer_counts in rank0["seen"]:  # (forwards, E) per layer
        assert layer_counts.shape[0] == 3 and (layer_counts[:, IDLE] == 0).all()
        assert (layer_counts.sum(dim=0) > 0).sum() == TINY.n_experts - 1
    for layer_counts in rank1["seen"]:
        assert (layer_counts[:, IDLE] > 0).all()
    assert_same_weights(rank0["weights"], rank1["weights"], rtol=0, atol=0)
    assert_same_weights(rank0["weights"], ddp_runs("idle_loop")[0]["weights"], rtol=1e-4, atol=1e-5)


def global_batch_losses():
    """The cross-entropy and router losses of the first global batch (rows 0-7) in one training-mode forward of
    the seeded model."""
    torch.manual_seed(0)
    module = LanguageModel(TINY.replace(expert_backend="loop"), warmup_steps=1)
    module.configure_model()
    rows = PatternData().tokens[:8]
    with torch.no_grad():
        out = module.model(rows[:, :-1], labels=rows[:, 1:])
    return float(out.loss), float(out.aux_loss), float(out.z_loss)


def test_logged_losses_are_those_of_the_global_batch_whatever_the_split(ddp_runs):
    """Batch 8 as (world 1, batch 8), (world 1, batch 4 x 2 accumulated), (world 2, batch 4), (world 2, batch 2 x 2):
    the logged train/loss (cross-entropy), train/aux_loss and train/z_loss of the first step are the global
    batch's, not one process's micro-batch's, and for world 1 vs 2 without accumulation the first step's
    gradients agree."""
    ce, aux, z = global_batch_losses()
    _, log_8, record_8, _ = fit_run(8, 1)
    _, log_4x2, _, _ = fit_run(4, 2)
    runs = {name: (log.series("train/loss"), log.series("train/aux_loss"), log.series("train/z_loss"))
            for name, log in (("w1 b8a1", log_8), ("w1 b4a2", log_4x2))}
    for name in ("b4a1", "b2a2"):
        for rank, seen in enumerate(ddp_runs(name)):
            runs[f"w2 {name} rank {rank}"] = (seen["ce"], seen["aux"], seen["z"])
    for name, (ce_logged, aux_logged, z_logged) in runs.items():
        assert len(ce_logged) == len(aux_logged) == len(z_logged) == 2, name  # one value per optimizer step
        assert ce_logged[0] == pytest.approx(ce, rel=1e-6), name
        assert aux_logged[0] == pytest.approx(aux, rel=1e-6), name
        assert z_logged[0] == pytest.approx(z, rel=1e-6), name
    # Without accumulation the second step starts from the same weights too.
    for i in range(3):
        assert runs["w2 b4a1 rank 0"][i][1] == pytest.approx(runs["w1 b8a1"][i][1], rel=1e-5)
    grads_2 = ddp_runs("b4a1")[0]["first_grads"]
    assert record_8.first_grads.keys() == grads_2.keys()
    for name, grad in record_8.first_grads.items():
        torch.testing.assert_close(grads_2[name], grad, rtol=1e-5, atol=1e-8, msg=lambda m, name=name: f"{name}: {m}")


def test_two_nodes_on_localhost_through_the_command_line_match_one_process(tmp_path, monkeypatch):
    """Two processes launched as two nodes would be (NODE_RANK 0 and 1, LOCAL_RANK 0, num_nodes=2, devices=1) run
    the real `fit` command with batch 2 each; one process with batch 4 sees the same global batches: the step losses
    agree, and both nodes end with the same weights, those of the single process."""
    from cli_runs import tiny_run_args, write_tiny_run

    import cli

    nodes, single = tmp_path / "nodes", tmp_path / "single"
    for folder in (nodes, single):
        folder.mkdir()
        write_tiny_run(folder)
    launch(["cli", str(nodes), str(nodes)], nodes, multi_node=True, timeout=120)
    rank0, rank1 = (torch.load(nodes / f"cli.rank{r}.pt") for r in range(2))
    assert len(rank0["losses"]) == 4
    assert rank0["losses"] == rank1["losses"]
    assert_same_weights(rank0["weights"], rank1["weights"], rtol=0, atol=0)

    monkeypatch.chdir(single)
    cli.main(["fit", *tiny_run_args(single), *SHORT_RUN,
              "--trainer.callbacks+=distributed_moe_worker.Record", f"--trainer.callbacks.out={single / 'cli'}"])
    reference = torch.load(single / "cli.rank0.pt")
    assert rank0["losses"] == pytest.approx(reference["losses"], rel=1e-5)
    assert_same_weights(rank0["weights"], reference["weights"], rtol=1e-4, atol=1e-5)
