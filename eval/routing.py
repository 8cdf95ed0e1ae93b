"""Where the MoE layers route evaluation tokens, per task and layer: recorded by forward hooks on the routers while
eval/scoring.py scores (it tells the recorder before every forward pass which positions are real tokens, of which
task, standing for how many requests), summed over processes, written as JSON lines and drawn as one heatmap.

Tokens counted: exactly those lm-eval's requests would compute if every request's whole input,
(context + continuation)[-(max_length + 1):][:-1], ran on its own without padding. Padding never counts; a shared
prefix, computed once per item, counts once per choice (its routing is the same in every choice's input), and the
first token after it has the prefix's last token as its predecessor.

Per task and MoE layer:
- expert_fraction (E,): the top-k assignments, i.e. (token, slot) pairs, each expert receives over all of them.
- router_entropy: the mean over tokens of the entropy, in nats, of the router's softmax over all E experts: how
  unsure the router is about each token (ln E at most).
- load_entropy: the entropy, in nats, of expert_fraction: how evenly the task's tokens spread (ln E: perfectly).
- same_top1_as_previous: of the tokens with a predecessor in their sequence, the share whose first-choice expert
  is the predecessor's (Mixtral, Jiang et al. 2024, section 5, "consecutive tokens"; about 1/E by chance).
- js_to_reference_bits: the Jensen-Shannon divergence, in bits (log base 2, so within [0, 1]), of expert_fraction
  from the same layer's fractions on reference data: the data module's validation batches (held-out training
  corpus) through the same model (`record_batches`).

Routing is the router's own decision (its Routing output: with a selection bias the chosen experts include it);
nothing is recomputed. Hooks exist only inside `with recorder:`, so scoring without a recorder costs nothing.
Shapes: B batch, T time, N = B*T tokens, S tasks, L MoE layers, E experts, k experts per token.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import torch.distributed as dist

from moe.generate import inference_context
from moe.router import Routing, TopKRouter


def moe_routers(model) -> list[tuple[int, TopKRouter]]:
    """(block index, router) of every MoE layer in layer order; empty for a dense model. The index is read from the
    module name (layers.<i>.mlp.router), so wrappers that prefix names (DDP, torch.compile) keep it."""
    routers = []
    for name, module in model.named_modules():
        if isinstance(module, TopKRouter):
            match = re.search(r"layers\.(\d+)\.", name)
            routers.append((int(match.group(1)) if match else len(routers), module))
    return routers


@dataclass
class RoutingSums:
    """Routing of some tokens as float64 sums, weighted by the requests each token stands for: summable over
    processes. Integers stay exact up to 2**53."""

    tasks: list[str]
    layers: list[int]  # block index of each MoE layer
    counts: torch.Tensor  # (S, L, E) top-k assignments per expert
    tokens: torch.Tensor  # (S,) tokens routed
    entropy_sum: torch.Tensor  # (S, L) router entropies (nats) summed over the tokens
    same_top1: torch.Tensor  # (S, L) tokens whose first choice is their predecessor's
    pairs: torch.Tensor  # (S,) tokens with a predecessor in their sequence

    def _tensors(self) -> list[torch.Tensor]:
        return [getattr(self, f.name) for f in fields(self) if f.name not in ("tasks", "layers")]

    def select(self, tasks: list[str]) -> RoutingSums:
        """These sums for `tasks`, in that order; a task never seen has zeros."""
        def pick(t: torch.Tensor) -> torch.Tensor:
            out = t.new_zeros((len(tasks), *t.shape[1:]))
            for i, task in enumerate(tasks):
                if task in self.tasks:
                    out[i] = t[self.tasks.index(task)]
            return out

        return RoutingSums(list(tasks), list(self.layers), *(pick(t) for t in self._tensors()))

    def summed_over_processes(self, group=None) -> RoutingSums:
        """The sums over every process of `group` (default: the world) when torch.distributed runs more than one,
        else these: task names are gathered first, since a process may have seen none of a task's items."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
            return self
        names = [None] * dist.get_world_size(group)
        dist.all_gather_object(names, self.tasks, group=group)
        aligned = self.select(sorted(set().union(*names)))
        tensors = aligned._tensors()
        flat = torch.cat([t.flatten() for t in tensors])
        dist.all_reduce(flat, group=group)
        parts = flat.split([t.numel() for t in tensors])
        return RoutingSums(aligned.tasks, aligned.layers, *(p.view(t.shape) for p, t in zip(parts, tensors)))

    def divided(self, replicas: int) -> RoutingSums:
        """These sums over `replicas`: processes that routed the same tokens (tensor-parallel peers) each added
        them once."""
        if replicas == 1:
            return self
        return RoutingSums(list(self.tasks), list(self.layers), *(t / replicas for t in self._tensors()))

    # ------------------------------------------------------------------------------------------- figures
    def expert_fraction(self) -> torch.Tensor:
        """(S, L, E) assignments per expert over all assignments (zeros for a task without tokens)."""
        return self.counts / self.counts.sum(-1, keepdim=True).clamp(min=1)

    def router_entropy(self) -> torch.Tensor:
        """(S, L) mean per-token entropy of the router's softmax, nats."""
        return self.entropy_sum / self.tokens.clamp(min=1)[:, None]

    def load_entropy(self) -> torch.Tensor:
        """(S, L) entropy of expert_fraction, nats."""
        return torch.special.entr(self.expert_fraction()).sum(-1)

    def same_top1_as_previous(self) -> torch.Tensor:
        """(S, L) share of tokens with a predecessor whose first-choice expert is the predecessor's."""
        return self.same_top1 / self.pairs.clamp(min=1)[:, None]


def js_divergence_bits(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence over the last dimension, in bits: (KL(p||m) + KL(q||m)) / 2, m = (p + q) / 2,
    with 0 log 0 = 0. Inputs are distributions (non-negative, summing to one)."""
    m = (p + q) / 2

    def kl_to_m(a: torch.Tensor) -> torch.Tensor:
        return torch.where(a > 0, a * torch.log2(a / m), 0.0).sum(-1)  # a > 0 implies m > 0

    return (kl_to_m(p) + kl_to_m(q)) / 2


@dataclass
class _Pass:
    """What scoring announced about the forward pass under way, as per-token tensors."""

    shape: tuple[int, int]  # (B, T)
    token_task: torch.Tensor  # (N,) task index
    token_weight: torch.Tensor  # (N,) float64: requests the token stands for, 0 for padding
    pair_weight: torch.Tensor  # (B, T) float64: the same where the token has a predecessor in its sequence
    continues: torch.Tensor | None  # (B,) row of the previous pass that each row continues
    last: torch.Tensor  # (B,) position of each row's last real token (-1 for an empty row)
    real: torch.Tensor  # (N_real,) flat positions b * T + t of the real tokens
    recorded: set[int] = field(default_factory=set)  # router slots that have seen this pass


class RoutingRecorder:
    """Records a model's routing per task while entered (`with recorder:`), as eval/scoring.py's observer:

        recorder = RoutingRecorder(model)
        with recorder:
            evaluate(model, tokenizer, tasks, routing=recorder)
        sums = recorder.sums().summed_over_processes()
    """

    def __init__(self, model):
        self.routers = moe_routers(model)
        if not self.routers:
            raise ValueError("routing statistics need a model with MoE layers; this one has none")
        self.layers = [index for index, _ in self.routers]
        self.n_experts = self.routers[0][1].gate.out_features
        self.tasks: list[str] = []
        self._handles: list = []
        self._pass: _Pass | None = None
        self._last_top1: list[torch.Tensor | None] = [None] * len(self.routers)  # (B,) per layer, previous pass
        # Accumulated layer-major so that a layer's rows are contiguous: (L, S, E), (L, S), (L, S), (S,), (S,).
        self._counts = self._entropy = self._same = self._tokens = self._pairs = None

    def __enter__(self):
        self._handles = [router.register_forward_hook(self._hook(slot)) for slot, (_, router)
                         in enumerate(self.routers)]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._pass = [], None

    def before_forward(self, ids: torch.Tensor, lengths: list[int], tasks: list[str | None], weights: list[int],
                       continues: list[int] | None = None) -> None:
        """eval.scoring.ForwardObserver: the next forward pass runs ids (B, T), row r's first lengths[r] tokens
        real, of task tasks[r], standing for weights[r] requests; continues[r] is the row of the previous pass
        whose last real token precedes row r's first."""
        if not self._handles:
            raise RuntimeError("RoutingRecorder records only inside `with recorder:`")
        B, T = ids.shape
        device = ids.device
        for task, n in zip(tasks, lengths):
            if n > 0 and task not in self.tasks:
                self._add_task(task, device)
        length = torch.tensor(lengths, device=device)
        real = torch.arange(T, device=device) < length[:, None]  # (B, T)
        row_weight = torch.tensor(weights, dtype=torch.float64, device=device)[:, None]  # (B, 1)
        has_previous = real.clone()
        has_previous[:, 0] = False
        source = None
        if continues is not None:
            source = torch.tensor(continues, device=device)
            if self._pass is None:
                raise RuntimeError("a pass continues rows of a previous pass that was not recorded")
            has_previous[:, 0] = real[:, 0] & (self._pass.last[source] >= 0)
        task_index = torch.tensor([self.tasks.index(t) if n > 0 else 0 for t, n in zip(tasks, lengths)],
                                  device=device)  # (B,)
        token_weight, pair_weight = real * row_weight, has_previous * row_weight  # (B, T)
        if self.tasks:  # else nothing real was announced yet (a rank's dummy pass)
            self._tokens.index_add_(0, task_index, token_weight.sum(1))
            self._pairs.index_add_(0, task_index, pair_weight.sum(1))
        # An empty row has no last token (-1): a row continuing it has no predecessor.
        last = torch.where(length > 0, length - 1, -1)
        self._pass = _Pass((B, T), task_index.repeat_interleave(T), token_weight.flatten(), pair_weight, source, last,
                           real.flatten().nonzero()[:, 0])

    def sums(self) -> RoutingSums:
        """This process's sums so far (tasks in the order first seen; none when no real token ran here, as on a
        rank left only dummy passes)."""
        if self._counts is None:
            L, E = len(self.routers), self.n_experts
            empty = torch.zeros(0, dtype=torch.float64, device=self.routers[0][1].gate.weight.device)
            return RoutingSums([], list(self.layers), empty.new_zeros(0, L, E), empty, empty.new_zeros(0, L),
                               empty.new_zeros(0, L), empty.clone())
        def copy(t: torch.Tensor) -> torch.Tensor:  # never a view of the accumulators, which keep counting
            return t.clone(memory_format=torch.contiguous_format)

        return RoutingSums(list(self.tasks), list(self.layers), copy(self._counts.transpose(0, 1)),
                           copy(self._tokens), copy(self._entropy.T), copy(self._same.T), copy(self._pairs))

    # ------------------------------------------------------------------------------------------- internals
    def _add_task(self, task: str, device) -> None:
        self.tasks.append(task)
        L, E = len(self.routers), self.n_experts

        def grown(t: torch.Tensor | None, shape: tuple[int, ...], dim: int) -> torch.Tensor:
            zeros = torch.zeros(shape, dtype=torch.float64, device=device)
            return zeros if t is None else torch.cat([t, zeros], dim=dim)

        self._counts = grown(self._counts, (L, 1, E), 1)
        self._entropy = grown(self._entropy, (L, 1), 1)
        self._same = grown(self._same, (L, 1), 1)
        self._tokens = grown(self._tokens, (1,), 0)
        self._pairs = grown(self._pairs, (1,), 0)

    def _hook(self, slot: int):
        def record(module, inputs, routing: Routing) -> None:
            current = self._pass
            # The model routed all B*T tokens, or the real ones only (moe/unpadded.py: lengths given).
            if current is None or slot in current.recorded or routing.experts.shape[0] not in (
                    current.shape[0] * current.shape[1], current.real.numel()):
                raise RuntimeError("RoutingRecorder: a forward pass ran that scoring did not announce "
                                   "(before_forward) or whose shape differs")
            current.recorded.add(slot)
            B, T = current.shape
            experts, probs = routing.experts, routing.probs  # (N, k), (N, E)
            if experts.shape[0] != B * T:  # back to (B*T) rows; padding's weigh nothing
                experts = experts.new_zeros(B * T, experts.shape[1]).index_copy_(0, current.real, experts)
                probs = probs.new_zeros(B * T, probs.shape[1]).index_copy_(0, current.real, probs)
            k = experts.shape[1]
            if self.tasks:  # else no real token was announced yet (a rank's dummy pass)
                weight = current.token_weight
                flat_index = (current.token_task[:, None] * self.n_experts + experts).flatten()  # (N*k,)
                self._counts[slot].view(-1).index_add_(0, flat_index, weight.repeat_interleave(k))
                entropy = torch.special.entr(probs).sum(-1).double()  # (N,)
                self._entropy[slot].index_add_(0, current.token_task, weight * entropy)
            top1 = experts[:, 0].view(B, T)
            previous = torch.roll(top1, 1, dims=1)  # (B, T); column 0 is replaced or carries no weight
            if current.continues is not None and self._last_top1[slot] is not None:
                previous[:, 0] = self._last_top1[slot][current.continues]
            if self.tasks:
                same = ((top1 == previous) * current.pair_weight).sum(1)  # (B,)
                self._same[slot].index_add_(0, current.token_task[::T], same)
            self._last_top1[slot] = top1.gather(1, current.last.clamp(min=0)[:, None]).squeeze(1)  # (B,)

        return record


def record_batches(model, batches: Iterable[torch.Tensor], max_batches: int = 8,
                   name: str = "reference") -> RoutingSums:
    """This process's routing of the first max_batches token batches (B, T) (every token real), as task `name`:
    the reference distribution, from the data module's validation batches. Under a sharded model every process
    must pass as many batches (each process's share of the validation set does)."""
    recorder = RoutingRecorder(model)
    device = next(model.parameters()).device
    with torch.inference_mode(), inference_context(model), recorder:
        for ids in itertools.islice(batches, max_batches):
            ids = ids.to(device)
            B, T = ids.shape
            recorder.before_forward(ids, [T] * B, [name] * B, [1] * B)
            model(ids, logits_at=torch.zeros_like(ids, dtype=torch.bool))  # the output layer is not needed
    return recorder.sums()


def reference_fractions(model, batches: Iterable[torch.Tensor], max_batches: int = 8, group=None) -> torch.Tensor:
    """(L, E) expert fractions of the first max_batches batches of every process of `group`, summed."""
    return record_batches(model, batches, max_batches).summed_over_processes(group).expert_fraction()[0]


# ----------------------------------------------------------------------------------------------- output
def routing_rows(sums: RoutingSums, reference: RoutingSums | None = None) -> list[dict]:
    """One dict per (task, layer) with the module docstring's figures, tasks in sums' order; the reference's
    rows come first, with task None and no divergence."""
    reference_fraction = None if reference is None else reference.expert_fraction()[0]  # (L, E)
    rows = []
    for source, is_reference in ((reference, True), (sums, False)):
        if source is None:
            continue
        fraction = source.expert_fraction()
        figures = {"router_entropy": source.router_entropy(), "load_entropy": source.load_entropy(),
                   "same_top1_as_previous": source.same_top1_as_previous()}
        if not is_reference and reference_fraction is not None:
            figures["js_to_reference_bits"] = js_divergence_bits(fraction, reference_fraction[None])
        for s, task in enumerate(source.tasks):
            for j, layer in enumerate(source.layers):
                rows.append({"task": None if is_reference else task, "layer": layer,
                             "tokens": int(source.tokens[s]), "expert_fraction": fraction[s, j].tolist(),
                             **{key: float(value[s, j]) for key, value in figures.items()}})
    return rows


def write_routing_jsonl(path: str | Path, record: dict) -> None:
    """Append one evaluation's routing as JSON lines, one per (task, layer): record["rows"] (routing_rows) each
    merged with the record's other keys (stage, step, checkpoint), so that the file loads as one flat table."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    context = {key: value for key, value in record.items() if key != "rows"}
    with path.open("a") as f:
        for row in record["rows"]:
            f.write(json.dumps({**context, **row}) + "\n")


HEATMAP_DPI, HEATMAP_CELL, HEATMAP_MARGIN, HEATMAP_COLORBAR, HEATMAP_COLUMNS = 100, 25, 100, 100, 3  # pixels


def _grid(n_panels: int) -> tuple[int, int]:
    columns = min(n_panels, max(HEATMAP_COLUMNS, math.ceil(math.sqrt(n_panels))))
    return columns, math.ceil(n_panels / columns)


def heatmap_size(n_panels: int, n_layers: int, n_experts: int) -> tuple[int, int]:
    """(width, height) in pixels of draw_routing_heatmap's image: panels of HEATMAP_CELL pixels per layer and
    expert plus a margin for labels, HEATMAP_COLUMNS to a row (more for many tasks: a near-square grid), and a
    colour bar."""
    columns, rows = _grid(n_panels)
    return (columns * (HEATMAP_MARGIN + HEATMAP_CELL * n_experts) + HEATMAP_COLORBAR,
            rows * (HEATMAP_MARGIN + HEATMAP_CELL * n_layers))


def draw_routing_heatmap(path: str | Path, stats: RoutingSums, reference: RoutingSums | None = None) -> Path:
    """One PNG of heatmap_size: for the reference (first, when given) and every task, a layers x experts grid of
    expert_fraction on one shared colour scale, titled with the mean divergence from the reference over layers."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state, Agg renders the PNG

    panels = [("validation data (reference)", reference.expert_fraction()[0])] if reference is not None else []
    panels += list(zip(stats.tasks, stats.expert_fraction()))
    reference_fraction = None if reference is None else panels[0][1]
    L, E = len(stats.layers), stats.counts.shape[-1]
    width, height = heatmap_size(len(panels), L, E)
    figure = Figure(figsize=(width / HEATMAP_DPI, height / HEATMAP_DPI), dpi=HEATMAP_DPI, layout="constrained")
    columns, rows = _grid(len(panels))
    axes = figure.subplots(rows, columns, squeeze=False)
    vmax = max(float(fraction.max()) for _, fraction in panels) or 1.0
    for ax in axes.flat[len(panels):]:
        ax.set_axis_off()
    for ax, (name, fraction) in zip(axes.flat, panels):
        image = ax.imshow(fraction.float().cpu().numpy(), vmin=0.0, vmax=vmax, cmap="viridis", aspect="auto",
                          interpolation="nearest")
        title = name
        if reference_fraction is not None and fraction is not reference_fraction:
            title += f"\nJS {js_divergence_bits(fraction, reference_fraction).mean():.3f} bits"
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("expert", fontsize=7)
        ax.set_ylabel("layer", fontsize=7)
        ax.set_yticks(range(L), [str(layer) for layer in stats.layers], fontsize=6)
        ax.tick_params(axis="x", labelsize=6)
    figure.colorbar(image, ax=axes.ravel().tolist(), label="share of top-k assignments")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path
