"""A ladder file (configs/ladder/*.yaml): the families of model sizes `moe ladder` trains, and how long each rung
trains. Read and checked here, before anything runs; errors name the file and the key.

    configs: [configs/data/stdlib.yaml, configs/trainer/cpu.yaml]  # --config files of every rung's fit
    flags: {model.lr: 0.003}          # flags of every rung's fit (without the leading --)
    batch_size: 16                    # sequences per optimizer step (data.batch_size)
    seq_len: 128                      # tokens per sequence (model.config.max_seq_len)
    tokens_per_param: 10              # budget: tokens = this x the rung's active non-embedding parameters,
    # tokens: 2e6                     #   or the same tokens for every rung,
    # flops: 1e13                     #   or the same training compute for every rung (PaLM FLOPs per token)
    fit_size: non_embedding           # the N of the L(N) fit: non_embedding, active_non_embedding, total or active
    warmup_fraction: 0.1              # of each rung's steps
    evals: 4                          # validation points per rung, the last at its final step
    val_batches: 32                   # validation batches at each point
    families:
      dense:
        model: configs/model/tiny-dense.yaml   # the base config: a preset, a model YAML or an HF directory
        rungs:                                 # ModelConfig fields over the base, or width/depth (below)
          - {width: 32, depth: 2}
          - {d_model: 48, n_layers: 2, n_heads: 3, n_kv_heads: 3, ffn_dim: 128, name: small}
        target: {width: 128, depth: 4}         # held out of the fit and predicted; trained unless train: false

A `width`/`depth` rung scales the base config: d_model = width, n_layers = depth, the base's head_dim kept (heads =
width / head_dim; key/value heads at the base's ratio where the head count divides, else the largest divisor below
it) and its feed-forward widths scaled with d_model (rounded up to a multiple of 8). The vocabulary is the data's
(`data.vocab_size` in the configs or flags), which the fit links to the model. Tokens per step are batch_size x
seq_len x the trainer's accumulate_grad_batches x its devices (from the configs or flags, the same for every rung).
A ladder runs on one node: with one device the rungs' fits run inside its process, with several (trainer.devices: 8
for the GPUs of a node) each fit runs as a child process that Lightning starts the others from. `widths: [...]` with `depths: [...]` (or one depth) lists such rungs in short.
A rung may set its own `tokens`, `tokens_per_param` or `flops` (varying D at a fixed N gives L(N, D) its data) and
its own `flags`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from moe.config import ModelConfig
from moe.errors import InputError

TOP_KEYS = {"configs", "flags", "batch_size", "seq_len", "tokens_per_param", "tokens", "flops", "fit_size",
            "warmup_fraction", "evals", "val_batches", "families", "out"}
FAMILY_KEYS = {"model", "rungs", "widths", "depths", "target", "flags"}
BUDGET_KEYS = ("tokens_per_param", "tokens", "flops")
RUNG_KEYS = {"name", "width", "depth", "flags", "train", *BUDGET_KEYS}
SIZES = ("non_embedding", "active_non_embedding", "total", "active")
# Settings the ladder gives every rung itself: a flag setting one of these would break the rung's budget or move its
# run out of the ladder's folder.
LADDER_FLAGS = ("trainer.max_steps", "trainer.max_epochs", "trainer.max_time", "trainer.val_check_interval",
                "trainer.check_val_every_n_epoch", "trainer.limit_val_batches", "trainer.logger",
                "trainer.limit_train_batches", "data.batch_size", "data.seq_len", "model.config",
                "model.warmup_steps", "model.total_steps", "model.init_from", "ckpt_path")
# Set once for the whole ladder (shared configs or flags): they size every rung's step, hence its budget in steps.
SHARED_FLAGS = ("trainer.devices", "trainer.num_nodes", "trainer.accumulate_grad_batches")


@dataclass
class Rung:
    """One model of a family, with what it trains on: the config, the budget and its steps."""

    family: str
    name: str
    config: ModelConfig
    tokens: int  # trained, steps x tokens per step
    steps: int
    flags: dict = field(default_factory=dict)
    is_target: bool = False
    train: bool = True
    where: str = ""  # the key of the ladder file that defines it, for messages
    budget: tuple[str, float] = ("tokens", 0.0)  # as the ladder file gives it: (tokens_per_param|tokens|flops, value)

    def size(self, measure: str) -> int:
        """Parameters by a SIZES measure (embedding = input table and output layer)."""
        c = self.config
        return {"total": c.num_params(), "active": c.num_active_params(),
                "non_embedding": c.num_params() - c.embedding_params(),
                "active_non_embedding": c.num_active_params() - c.embedding_params()}[measure]

    def flops(self, seq_len: int) -> float:
        """Training compute, PaLM FLOPs per token (attention included) times the tokens trained."""
        return self.config.flops_per_token(seq_len) * self.tokens


@dataclass
class LadderSpec:
    path: Path
    configs: list[str]
    flags: dict
    batch_size: int
    seq_len: int
    tokens_per_step: int
    fit_size: str
    warmup_fraction: float
    evals: int
    val_batches: int
    out: Path
    families: dict[str, list[Rung]]  # rungs in order, then the target if any
    config_contents: dict[str, object] = field(default_factory=dict)  # each of `configs` parsed (None: not YAML)
    processes: int = 1  # trainer.devices: above 1, each rung's fit runs in a child process (moe/planning/ladder.py)

    def rungs(self) -> list[Rung]:
        return [rung for family in self.families.values() for rung in family]

    def warmup_steps(self, rung: Rung) -> int:
        return max(1, round(self.warmup_fraction * rung.steps))


def _error(path: Path, key: str, message: str) -> InputError:
    return InputError(f"{path}: {key}: {message}")


def _positive(path: Path, key: str, value, kind=float, minimum=0.0, strict=True):
    try:
        number = kind(float(value)) if kind is int else kind(value)
    except (TypeError, ValueError):
        raise _error(path, key, f"{value!r} is not a number") from None
    if kind is int and float(value) != number:
        raise _error(path, key, f"{value!r} is not a whole number")
    if number < minimum or (strict and number == minimum):
        raise _error(path, key, f"must be {'>' if strict else '>='} {minimum:g}, got {value}")
    return number


def _unknown(path: Path, key: str, given: dict, known: set[str]) -> None:
    unknown = sorted(set(given) - known)
    if unknown:
        raise _error(path, key + unknown[0] if key else unknown[0],
                     f"unknown key (known: {', '.join(sorted(known))})")


def _flags(path: Path, key: str, value, shared: bool = True) -> dict:
    """A mapping of flags; `shared`: the ladder's own, which may set the SHARED_FLAGS a family's or rung's may not."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _error(path, key, "must be a mapping of flag to value, e.g. {model.lr: 0.003}")
    flags = {str(name).removeprefix("--"): v for name, v in value.items()}
    for name in flags:
        if not shared and name in SHARED_FLAGS:
            raise _error(path, f"{key}.{name}", "sizes the step of every rung: set it once, in the ladder's "
                         "`flags` or `configs`")
        if any(name == owned or name.startswith(owned + ".") for owned in LADDER_FLAGS):
            raise _error(path, f"{key}.{name}", "is set by the ladder for each rung (budget, schedule, validation, "
                         "run folder): use the ladder's own keys (batch_size, seq_len, tokens_per_param/tokens/flops, "
                         "warmup_fraction, evals, val_batches) or the rung's fields")
    return flags


def scale_config(base: ModelConfig, width: int, depth: int, head_dim: int | None = None) -> dict:
    """The ModelConfig fields of `base` scaled to d_model `width` and `depth` layers (see the module docstring),
    with heads of `head_dim` (default: the base's)."""
    head_dim = head_dim or base.head_dim
    if width % head_dim:
        raise ValueError(f"width {width} is not a multiple of the base config's head_dim {head_dim}")
    n_heads = width // head_dim
    group = max(1, base.n_heads // base.n_kv_heads)
    n_kv_heads = max(1, n_heads // group)
    while n_heads % n_kv_heads:
        n_kv_heads -= 1

    def scaled(ffn: int) -> int:
        return 8 * math.ceil(ffn * width / base.d_model / 8)

    fields = {"d_model": width, "n_layers": depth, "n_heads": n_heads, "n_kv_heads": n_kv_heads,
              "head_dim": head_dim, "ffn_dim": scaled(base.ffn_dim)}
    if base.is_moe:
        fields["expert_ffn_dim"] = scaled(base.expert_ffn_dim)
    return fields


def _rung_config(path: Path, key: str, base: ModelConfig, entry: dict) -> ModelConfig:
    fields = {k: v for k, v in entry.items() if k not in RUNG_KEYS}
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    for name in fields:
        if name not in known:
            raise _error(path, f"{key}.{name}", f"not a ModelConfig field nor a rung key ({', '.join(sorted(RUNG_KEYS))})")
    if ("width" in entry) != ("depth" in entry):
        raise _error(path, key, "give width and depth together")
    if "width" in entry:
        width = _positive(path, f"{key}.width", entry["width"], int)
        depth = _positive(path, f"{key}.depth", entry["depth"], int)
        try:
            fields = {**scale_config(base, width, depth, fields.get("head_dim")), **fields}
        except ValueError as error:
            raise _error(path, key, str(error)) from None
    try:
        config = base.replace(**fields)
        config.validate()
    except (ValueError, TypeError) as error:
        raise _error(path, key, str(error)) from None
    return config


def _rung_entries(path: Path, key: str, family: dict) -> list[tuple[str, dict]]:
    rungs = family.get("rungs")
    if ("widths" in family) == (rungs is not None):
        raise _error(path, key, "give rungs: [...] or widths: [...] with depths: [...]")
    if rungs is not None:
        if not isinstance(rungs, list) or not all(isinstance(r, dict) for r in rungs):
            raise _error(path, f"{key}.rungs", "must be a list of mappings")
        return [(f"{key}.rungs[{i}]", r) for i, r in enumerate(rungs)]
    widths, depths = family["widths"], family.get("depths")
    if not isinstance(widths, list) or depths is None:
        raise _error(path, f"{key}.widths", "must be a list, with depths: [...] (or one depth for all)")
    depths = depths if isinstance(depths, list) else [depths] * len(widths)
    if len(depths) != len(widths):
        raise _error(path, f"{key}.depths", f"{len(depths)} depths for {len(widths)} widths")
    return [(f"{key}.widths[{i}]", {"width": w, "depth": d}) for i, (w, d) in enumerate(zip(widths, depths))]


def load_ladder(path: str | Path, out: str | Path | None = None) -> LadderSpec:
    """Read and check a ladder file; every rung's config, budget and steps resolved. Raises InputError naming the
    file and key, FileNotFoundError for a file it names."""
    from moe.planning.plan import load_model_config

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such ladder file: {path}")
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        raise InputError(f"{path}" + (f", line {mark.line + 1}" if mark else "") + ": not valid YAML") from None
    if not isinstance(spec, dict):
        raise InputError(f"{path}: a ladder file is a mapping (configs, families, ...), see configs/ladder/")
    _unknown(path, "", spec, TOP_KEYS)
    configs = spec.get("configs") or []
    if not isinstance(configs, list):
        raise _error(path, "configs", "must be a list of config files")
    contents = {}  # each shared config file parsed once: its trainer/data settings, and the rungs' fingerprint
    for i, config in enumerate(configs):
        if not Path(config).is_file():
            raise _error(path, f"configs[{i}]", f"no such config file: {config} (paths are relative to the "
                         "working directory, as fit's --config)")
        try:
            content = contents[str(config)] = yaml.safe_load(Path(config).read_text())
        except yaml.YAMLError:
            content = contents[str(config)] = None  # the fit names the file and line
        model = content.get("model") if isinstance(content, dict) else None
        if isinstance(model, dict) and ("config" in model or "init_from" in model):
            raise _error(path, f"configs[{i}]", f"{config} sets the model (model.config / model.init_from): each "
                         "family gives its own as `model:`, scaled per rung")
    flags = _flags(path, "flags", spec.get("flags"))
    batch_size = _positive(path, "batch_size", spec.get("batch_size", 16), int)
    seq_len = _positive(path, "seq_len", spec.get("seq_len", 256), int)
    composed = _Composed(contents, flags)
    accumulate = _positive(path, composed.where("trainer.accumulate_grad_batches"),
                           composed.get("trainer.accumulate_grad_batches", 1), int)
    devices, num_nodes = composed.get("trainer.devices", 1), composed.get("trainer.num_nodes", 1)
    if isinstance(devices, str) and devices.isdigit():
        devices = int(devices)
    if not isinstance(devices, int) or isinstance(devices, bool) or devices < 1:
        raise _error(path, composed.where("trainer.devices"), f"{devices!r}: a ladder counts the tokens of each "
                     "step, so it needs the number of processes: set flags: {trainer.devices: N}")
    num_nodes = _positive(path, composed.where("trainer.num_nodes"), num_nodes, int)
    if num_nodes > 1:
        # The rungs' fits are started by the ladder, on its node; the other nodes would have to run the same
        # ladder in step, each one's checks and report racing over the shared run folders.
        raise _error(path, composed.where("trainer.num_nodes"), f"{num_nodes}: a ladder trains its rungs on one "
                     "node (trainer.devices: its GPUs); several nodes are not supported")
    tokens_per_step = batch_size * seq_len * accumulate * devices
    vocab_size = composed.get("data.vocab_size")
    fit_size = spec.get("fit_size", "non_embedding")
    if fit_size not in SIZES:
        raise _error(path, "fit_size", f"{fit_size!r} is not one of {', '.join(SIZES)}")
    warmup = _positive(path, "warmup_fraction", spec.get("warmup_fraction", 0.1), float, strict=False)
    if warmup >= 1:
        raise _error(path, "warmup_fraction", f"must be below 1, got {warmup}")
    evals = _positive(path, "evals", spec.get("evals", 4), int)
    val_batches = _positive(path, "val_batches", spec.get("val_batches", 32), int)
    default_budget = _budget(path, "", spec, required=True)
    families_spec = spec.get("families")
    if not isinstance(families_spec, dict) or not families_spec:
        raise _error(path, "families", "give at least one family: {name: {model: ..., rungs: [...]}}")
    families: dict[str, list[Rung]] = {}
    for family_name, family in families_spec.items():
        key = f"families.{family_name}"
        if not isinstance(family, dict):
            raise _error(path, key, "must be a mapping with model and rungs (or widths and depths)")
        _unknown(path, key + ".", family, FAMILY_KEYS)
        if "model" not in family:
            raise _error(path, f"{key}.model", "missing: a preset, a model YAML or an HF directory")
        try:
            base = load_model_config(str(family["model"]))
        except (ValueError, FileNotFoundError) as error:
            raise _error(path, f"{key}.model", str(error)) from None
        # The data's tokenizer sets the vocabulary (the command line links it), hence the output layer's FLOPs.
        base = base.replace(max_seq_len=seq_len, **({"vocab_size": int(vocab_size)} if vocab_size else {}))
        family_flags = {**flags, **_flags(path, f"{key}.flags", family.get("flags"), shared=False)}
        entries = _rung_entries(path, key, family)
        if family.get("target") is not None:
            if not isinstance(family["target"], dict):
                raise _error(path, f"{key}.target", "must be a mapping, as a rung")
            entries.append((f"{key}.target", family["target"]))
        rungs: list[Rung] = []
        for where, entry in entries:
            _unknown(path, where + ".", entry, RUNG_KEYS | {f.name for f in dataclasses.fields(ModelConfig)})
            config = _rung_config(path, where, base, entry)
            name = str(entry.get("name") or f"d{config.d_model}-l{config.n_layers}")
            if any(r.name == name for r in rungs):
                raise _error(path, where, f"two rungs named {name!r}: give one a name")
            budget = _budget(path, where + ".", entry, required=False) or default_budget
            tokens = _tokens(budget, config, seq_len)
            # Whole optimizer steps, a multiple of `evals` so that validation falls on the last one.
            steps = evals * max(1, math.ceil(tokens / tokens_per_step / evals))
            rungs.append(Rung(family_name, name, config.replace(name=name), steps * tokens_per_step, steps,
                              {**family_flags, **_flags(path, f"{where}.flags", entry.get("flags"), shared=False)},
                              is_target=where.endswith(".target"), train=bool(entry.get("train", True)),
                              where=where, budget=budget))
        if sum(not r.is_target for r in rungs) < 1:
            raise _error(path, key, "no rungs")
        families[str(family_name)] = rungs
    out_dir = Path(out) if out is not None else Path(spec.get("out") or Path("runs") / "ladder" / path.stem)
    return LadderSpec(path, [str(c) for c in configs], flags, batch_size, seq_len, tokens_per_step, fit_size, warmup,
                      evals, val_batches, out_dir, families, contents, processes=devices)


class _Composed:
    """Trainer and data settings as the rungs' fit composes them: the config files in order, then the flags."""

    def __init__(self, contents: dict[str, object], flags: dict):
        self.values: dict[str, tuple[object, str]] = {}
        for i, (config, content) in enumerate(contents.items()):
            for section in ("trainer", "data"):
                for name, value in (content.get(section) or {}).items() if isinstance(content, dict) else ():
                    self.values[f"{section}.{name}"] = (value, f"configs[{i}] ({config}): {section}.{name}")
        for name, value in flags.items():
            self.values[name] = (value, f"flags.{name}")

    def get(self, name: str, default=None):
        return self.values.get(name, (default, ""))[0]

    def where(self, name: str) -> str:
        return self.values.get(name, (None, f"flags.{name}"))[1]


def fingerprint(spec: LadderSpec, rung: Rung) -> dict:
    """What else a rung's run depends on besides its own settings: the shared config files' contents (parsed, so a
    comment edit does not count) and the flags."""
    return {"configs": spec.config_contents, "flags": rung.flags}


def _budget(path: Path, key: str, entry: dict, required: bool) -> tuple[str, float] | None:
    given = [k for k in BUDGET_KEYS if entry.get(k) is not None]
    if len(given) > 1:
        raise _error(path, key + given[1], f"give one budget, not both {given[0]} and {given[1]}")
    if not given:
        if required:
            raise _error(path, "tokens_per_param", "missing: give the rungs' budget as tokens_per_param, tokens or "
                         "flops")
        return None
    return given[0], _positive(path, key + given[0], entry[given[0]], float)


def _tokens(budget: tuple[str, float], config: ModelConfig, seq_len: int) -> float:
    kind, value = budget
    if kind == "tokens":
        return value
    if kind == "flops":
        return value / config.flops_per_token(seq_len)
    return value * (config.num_active_params() - config.embedding_params())
