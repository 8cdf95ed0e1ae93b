"""Communication per MoE layer and GPU for one forward + backward: expert parallelism's all-to-alls against FSDP2's
traffic on the stacked expert weights. Arithmetic only (no GPU, no process group); derivation in
docs/distributed.md, "Expert parallelism: communication per MoE layer".

    PYTHONPATH=. python bench/ep_comm_volume.py                      # the table of docs/distributed.md
    PYTHONPATH=. python bench/ep_comm_volume.py --tokens 2048 8192 --nvlink 350 --ib 40 --param-bytes 4

Per GPU and MoE layer, with T tokens per GPU, k experts per token, D model dim, E experts of hidden width F,
N data-parallel GPUs, EP size P, M = N / P, bytes per value a (activations), p (gathered weights), g (gradients):
  all-to-all (dispatch + combine, forward and backward): 4 T k D a (P-1)/P, uniform routing
  expert weights under FSDP2 (all-gather fwd + all-gather bwd + reduce-scatter): (2p + g) 3 (E/P) F D (M-1)/M
Times are bytes over the link the group crosses: NVLink inside a node, InfiniBand when the group spans nodes (an
all-to-all that does both is gated by the slower share); the two terms are added, with no overlap.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from train_speed import CONFIGS  # moe-bench's shape, defined once there

from moe.config import ModelConfig
from moe.presets import get_preset

# (label, nodes, EP size, EP group inside a node (ranks i*P..) or across nodes (one rank per node, stride N/P))
LAYOUTS = [("1×8, FSDP2", 1, 1, True), ("1×8, EP=4", 1, 4, True), ("1×8, EP=8", 1, 8, True),
           ("4×8, FSDP2", 4, 1, True), ("4×8, EP=8 in each node", 4, 8, True),
           ("4×8, EP=4 across nodes", 4, 4, False)]


def models() -> dict[str, ModelConfig]:
    return {"mixtral-8x7b": get_preset("mixtral-8x7b"), "moe-bench": ModelConfig(**CONFIGS["moe-bench"]["model"])}


def layout_cost(c: ModelConfig, nodes: int, gpus: int, ep: int, inner: bool, args) -> tuple[float, float, float]:
    """(all-to-all seconds per token, expert-FSDP bytes, expert-FSDP seconds) for one GPU and one MoE layer."""
    n = nodes * gpus
    m = n // ep
    group = [r for r in range(ep)] if inner else [r * m for r in range(ep)]  # rank 0's EP group
    same_node = sum(1 for r in group if r // gpus == 0)  # members on rank 0's node, itself included
    per_token = 4 * c.top_k * c.d_model * args.act_bytes  # sent if every assignment left the GPU
    intra, inter = per_token * (same_node - 1) / ep, per_token * (ep - same_node) / ep  # bytes per token by link
    a2a_s = max(intra / (args.nvlink * 1e9), inter / (args.ib * 1e9))  # both links carry their share at once
    fsdp_group = [r * ep for r in range(m)] if inner else list(range(m))  # ranks holding the same experts
    spans_nodes = len({r // gpus for r in fsdp_group}) > 1
    weights = 3 * (c.n_experts // ep) * c.expert_ffn_dim * c.d_model
    fsdp_bytes = (2 * args.param_bytes + args.grad_bytes) * weights * (m - 1) / m
    return a2a_s, fsdp_bytes, fsdp_bytes / ((args.ib if spans_nodes else args.nvlink) * 1e9)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384], help="tokens per GPU per micro-batch")
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--nvlink", type=float, default=450.0, help="GB/s per GPU per direction inside a node")
    parser.add_argument("--ib", type=float, default=50.0, help="GB/s per GPU per direction between nodes")
    parser.add_argument("--act-bytes", type=int, default=2, help="bytes per dispatched activation value")
    parser.add_argument("--param-bytes", type=int, default=2, help="bytes per gathered weight")
    parser.add_argument("--grad-bytes", type=int, default=2, help="bytes per reduce-scattered gradient")
    args = parser.parse_args(argv)
    tok = args.tokens
    print(f"per GPU and MoE layer, one forward + backward; NVLink {args.nvlink:g} GB/s, IB {args.ib:g} GB/s; bytes "
          f"a={args.act_bytes} p={args.param_bytes} g={args.grad_bytes}; MB = 1e6 bytes\n")
    print("| model | GPUs, layout | " + " | ".join(f"all-to-all MB, {t} tok" for t in tok) + " | expert FSDP2 MB | "
          + " | ".join(f"ms, {t} tok" for t in tok) + " | EP faster below, tokens |")
    print("|---|---|" + "---:|" * (2 * len(tok) + 2))
    for name, c in models().items():
        for label, nodes, ep, inner in LAYOUTS:
            a2a_s, fsdp_bytes, fsdp_s = layout_cost(c, nodes, args.gpus_per_node, ep, inner, args)
            plain_s = layout_cost(c, nodes, args.gpus_per_node, 1, True, args)[2]
            per_token_bytes = 4 * c.top_k * c.d_model * args.act_bytes * (ep - 1) / ep
            even = "-" if ep == 1 else ("never" if fsdp_s >= plain_s else f"{(plain_s - fsdp_s) / a2a_s:,.0f}")
            print(f"| {name} | {label} | " + " | ".join(f"{per_token_bytes * t / 1e6:,.1f}" for t in tok)
                  + f" | {fsdp_bytes / 1e6:,.1f} | " + " | ".join(f"{(a2a_s * t + fsdp_s) * 1e3:,.2f}" for t in tok)
                  + f" | {even} |")


if __name__ == "__main__":
    main()
