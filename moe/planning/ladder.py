"""`moe ladder`: train a ladder of model sizes, fit scaling laws to their final validation losses and predict a
larger run (Kaplan et al. 2020; OLMo's model ladders, Bhagia et al. 2024).

Each rung is an ordinary `fit` of the command line (in the ladder's process, or a child process when the trainer has
several devices) in its own run folder, `<out>/<family>/<rung>/` (metrics.csv,
config.yaml, checkpoints/), from the ladder's config files plus the rung's settings, which the ladder writes beside
that folder first, as `<out>/<family>/<rung>.yaml`. A rung whose metrics.csv holds a validation loss at its last
step is done; one with a checkpoint resumes from it; one stopped before its first checkpoint starts again; a rung
whose settings file differs from its settings now is refused (its losses belong to another run). So a ladder stopped
anywhere continues where it was by running the same command again.

Then, per family with at least four finished rungs (the target held out): L(N) = E + A / N^alpha on the rungs'
parameter counts (ladder file's fit_size: Kaplan's non-embedding parameters by default), L(C) on their training
compute (the frontier of Kaplan's figure 1, since each rung is trained to its budget), and L(N, D) where rungs
vary the tokens at a size; the target's loss predicted with a 95% interval and, once trained, compared with what
it reached. With a dense and an MoE family, each MoE rung's compute multiplier: the dense compute that reaches its
loss on the dense L(C), over its own (Clark et al. 2022). Written as `<out>/ladder.json` and `<out>/ladder.png`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from moe.config import ModelConfig
from moe.errors import InputError
from moe.planning.fit import PowerLawFit, compute_multiplier, fit_chinchilla, fit_power_law
from moe.planning.ladder_spec import LadderSpec, Rung, fingerprint

MIN_RUNGS = 4  # a power law with an irreducible term has 3 parameters; one more for its uncertainty


def rung_dir(spec: LadderSpec, rung: Rung) -> Path:
    return spec.out / rung.family / rung.name


def rung_file(spec: LadderSpec, rung: Rung) -> Path:
    """The rung's settings as a config file, beside its run folder (a file in it would make Lightning's CSV logger
    warn that it deletes what it finds there)."""
    return spec.out / rung.family / f"{rung.name}.yaml"


def rung_settings(spec: LadderSpec, rung: Rung) -> dict:
    """The settings the ladder gives the rung's fit, as a config file composed after the ladder's `configs` (which
    set no model config, ladder_spec checks). The model config holds the fields away from ModelConfig's defaults, so
    that a field added to ModelConfig later does not make every finished rung look like another run."""
    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig) if f.default is not dataclasses.MISSING}
    config = {k: v for k, v in dataclasses.asdict(rung.config).items()
              if k not in ("vocab_size", "extra") and (k not in defaults or v != defaults[k])}
    interval = rung.steps // spec.evals
    return {
        "model": {"config": config, "warmup_steps": spec.warmup_steps(rung)},
        "data": {"batch_size": spec.batch_size},
        "trainer": {
            "max_steps": rung.steps, "val_check_interval": interval, "check_val_every_n_epoch": None,
            "limit_val_batches": spec.val_batches, "log_every_n_steps": max(1, min(10, interval)),
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                       "init_args": {"save_dir": str(spec.out / rung.family), "name": "", "version": rung.name}},
            "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                           "init_args": {"save_last": True, "every_n_train_steps": interval}}],
        },
    }


FINGERPRINT = "# fingerprint: "


def rung_header(spec: LadderSpec, rung: Rung) -> str:
    """The settings file's first lines: where the rung comes from, and what else its run depends on (one JSON line,
    compared when the ladder runs again)."""
    return (f"# Rung {rung.name} of family {rung.family} (from {spec.path}: {rung.where}), written by moe ladder.\n"
            f"{FINGERPRINT}{json.dumps(fingerprint(spec, rung), sort_keys=True)}\n")


def write_rung_file(spec: LadderSpec, rung: Rung) -> Path:
    """The rung's settings file, which its fit's command line names (see fit_args)."""
    path = rung_file(spec, rung)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(rung_header(spec, rung) + yaml.safe_dump(rung_settings(spec, rung), sort_keys=False))
    return path


def _saved_fingerprint(text: str) -> dict | None:
    for line in text.splitlines():
        if line.startswith(FINGERPRINT):
            try:
                return json.loads(line[len(FINGERPRINT):])
            except json.JSONDecodeError:
                return None
    return None


def fit_args(spec: LadderSpec, rung: Rung) -> list[str]:
    """The command line of the rung's fit (after `fit`), without the checkpoint to resume from."""
    args = [arg for config in spec.configs for arg in ("--config", config)]
    return [*args, "--config", str(rung_file(spec, rung)), *_flag_args(rung.flags)]


def _flag_args(flags: dict) -> list[str]:
    return [f"--{name}={value if isinstance(value, str) else json.dumps(value)}" for name, value in flags.items()]


@dataclass
class RungState:
    rung: Rung
    status: str  # "done", "resume", "new", "skipped" (a target with train: false)
    final_loss: float | None = None
    vocab_size: int | None = None  # the trained model's (the data's tokenizer), when known
    curve: tuple[np.ndarray, np.ndarray] | None = None  # (tokens seen, train loss)
    val_curve: tuple[np.ndarray, np.ndarray] | None = None  # (tokens seen, validation loss)


def rung_state(spec: LadderSpec, rung: Rung) -> RungState:
    """Where a rung stands, from its folder: "done" (a validation loss at its last step), "validate" (a checkpoint
    at its last step, stopped before the final validation), "resume" (an earlier checkpoint), "new", or "skipped"
    (a target with train: false and no run). Raises InputError for a run made with other settings."""
    from moe.plot import read_metrics

    folder = rung_dir(spec, rung)
    saved = rung_file(spec, rung)
    checkpoint = folder / "checkpoints" / "last.ckpt"
    metrics_file = folder / "metrics.csv"
    if saved.is_file() and (metrics_file.is_file() or checkpoint.exists()):
        text = saved.read_text()
        # As JSON reads them back (tuples as lists), both sides.
        before = json.loads(json.dumps({"settings": yaml.safe_load(text), "shared": _saved_fingerprint(text)}))
        now = json.loads(json.dumps({"settings": rung_settings(spec, rung), "shared": fingerprint(spec, rung)}))
        if before != now:
            changed = _first_difference(before, now)
            raise InputError(f"{spec.path}: {rung.where}: {folder} holds a run with other settings ({changed}; "
                             f"{saved}): delete both to train the rung again, or give the rung another name")
    metrics = read_metrics(metrics_file) if metrics_file.is_file() else {}
    state = RungState(rung, "new", vocab_size=_trained_vocab(folder))
    if "train/loss" in metrics:
        steps, losses = metrics["train/loss"]
        state.curve = (steps * spec.tokens_per_step, losses)
    val = metrics.get("val/loss")
    if val is not None:
        state.val_curve = (val[0] * spec.tokens_per_step, val[1])
        if val[0][-1] == rung.steps:
            state.status, state.final_loss = "done", float(val[1][-1])
            return state
    if checkpoint.exists():
        if _checkpoint_step(checkpoint) >= rung.steps:
            final = _final_validation(folder)
            if final is not None:
                state.status, state.final_loss = "done", final
            else:
                state.status = "validate"
        else:
            state.status = "resume"
    elif not rung.train:
        state.status = "skipped"
    return state


def _checkpoint_step(path: Path) -> int:
    """The optimizer steps a checkpoint was saved after."""
    import torch

    try:
        return int(torch.load(path, map_location="cpu", mmap=True, weights_only=True).get("global_step", -1))
    except Exception:  # noqa: BLE001 - unreadable: resuming from it reports what is wrong, naming the file
        return -1


def _final_validation(folder: Path) -> float | None:
    """The validation loss of the latest `validate` run on the rung's final checkpoint (see train_rung)."""
    from moe.plot import read_metrics

    runs = sorted((folder / "validate").glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name[8:]))
    for path in reversed(runs):
        val = read_metrics(path).get("val/loss")
        if val is not None:
            return float(val[1][-1])
    return None


def _first_difference(before, now, key: str = "") -> str:
    if isinstance(before, dict) and isinstance(now, dict):
        for name in sorted(set(before) | set(now), key=str):
            if before.get(name) != now.get(name):
                return _first_difference(before.get(name), now.get(name), f"{key}.{name}" if key else str(name))
    return f"{key}: {before!r} then, {now!r} now"


def _trained_vocab(folder: Path) -> int | None:
    hparams = folder / "hparams.yaml"
    if not hparams.is_file():
        return None
    try:
        config = (yaml.safe_load(hparams.read_text()) or {}).get("config") or {}
        return int(config["vocab_size"]) if isinstance(config, dict) and "vocab_size" in config else None
    except (yaml.YAMLError, TypeError, ValueError):
        return None


def train_rung(spec: LadderSpec, state: RungState) -> None:
    """Run the rung's fit through the command line (cli.main, or a child process with several devices), resuming
    from its last checkpoint if it has one; a run stopped between its last step and its final validation is validated
    instead (Lightning's fit would return at once). Raises InputError when it ends without its final validation
    loss."""
    rung = state.rung
    folder = rung_dir(spec, rung)
    if state.status == "new" and folder.exists():
        # Stopped before its first checkpoint: nothing to resume from, and its metrics would be appended to.
        print(f"{folder} holds no checkpoint: training {rung.name} from the start")
        shutil.rmtree(folder)
    write_rung_file(spec, rung)
    checkpoint = str(folder / "checkpoints" / "last.ckpt")
    if state.status == "validate":  # the model comes from the checkpoint; written to <run>/validate/version_N
        args = ["validate", *[a for c in spec.configs for a in ("--config", c)], *_flag_args(rung.flags),
                f"--data.batch_size={spec.batch_size}", f"--trainer.limit_val_batches={spec.val_batches}",
                f"--model.config.max_seq_len={spec.seq_len}", "--ckpt_path", checkpoint]
    else:
        args = ["fit", *fit_args(spec, rung)] + (["--ckpt_path", checkpoint] if state.status == "resume" else [])
    status = run_command(args) if spec.processes > 1 else _run_in_process(args)
    if status != 0:
        what = ("fix what the message above says" if status == 2 else "its folder keeps what it wrote") + \
            ": run the ladder again to continue"
        raise InputError(f"rung {rung.family}/{rung.name} stopped (exit status {status}) in {folder}; {what}")
    if rung_state(spec, rung).status != "done":
        raise InputError(f"rung {rung.family}/{rung.name} ended without a validation loss at step {rung.steps} in "
                         f"{folder}/metrics.csv: check its trainer settings (limit_val_batches, the data's "
                         "validation split)")


def _run_in_process(args: list[str]) -> int:
    """The command through cli.main in this process; its exit status."""
    import cli

    argv = sys.argv
    sys.argv = argv[:1]  # LightningCLI warns when it is given args while sys.argv holds others (the ladder's)
    try:
        cli.main(args)
    except SystemExit as stop:
        if stop.code not in (None, 0):
            return stop.code if isinstance(stop.code, int) else 1
    finally:
        sys.argv = argv
    return 0


def run_command(args: list[str], program: list[str] | None = None) -> int:
    """The command in a child process (`python cli.py ARGS`, or `program`), waited for; its exit status. With several
    devices a rung must run this way: Lightning starts a fit's other processes by running its command line again,
    which in the ladder's own process would be the ladder's. SIGTERM sent to the ladder alone (a scheduler that
    signals only its main process) is passed on, so that the rung saves its checkpoint (moe/train/preemption.py)
    and exits 143 before the ladder reports it; a child killed by a signal gives 128 + its number."""
    import cli

    child = subprocess.Popen(program or [sys.executable, cli.__file__, *args])
    forwarding = threading.current_thread() is threading.main_thread()
    if forwarding:
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: child.send_signal(signum))
    try:
        status = child.wait()
    finally:
        if forwarding:
            signal.signal(signal.SIGTERM, previous)
        if child.poll() is None:  # the ladder itself was interrupted (Ctrl-C): let the rung save and stop
            child.terminate()
            child.wait()
    return 128 - status if status < 0 else status


# ---- fits --------------------------------------------------------------------------------------------------------
@dataclass
class FamilyFit:
    family: str
    size_measure: str
    rungs: list[RungState]  # finished, in the fit
    by_size: PowerLawFit | None = None
    by_compute: PowerLawFit | None = None
    by_size_and_tokens: object | None = None  # ChinchillaFit
    target: RungState | None = None
    notes: list[str] = field(default_factory=list)

    def prediction(self, spec: LadderSpec) -> dict | None:
        """The target's predicted loss by L(N) and L(C), with intervals, and what it reached if trained."""
        if self.target is None or self.by_size is None:
            return None
        rung = self.target.rung
        n, c = rung.size(self.size_measure), rung_compute(spec, self.target)
        low, high = self.by_size.interval(n)
        result = {"rung": rung.name, "params": n, "flops": c, "predicted_loss": self.by_size.loss(n),
                  "interval_95": [low, high]}
        if self.by_compute is not None:
            c_low, c_high = self.by_compute.interval(c)
            result |= {"predicted_loss_by_compute": self.by_compute.loss(c), "interval_95_by_compute": [c_low, c_high]}
        if self.target.final_loss is not None:
            actual = self.target.final_loss
            result |= {"actual_loss": actual, "error": actual - result["predicted_loss"],
                       "inside_interval": low <= actual <= high}
        return result


def rung_compute(spec: LadderSpec, state: RungState) -> float:
    """Training FLOPs of the rung, with the vocabulary it trained with (the data's tokenizer) where known."""
    config = state.rung.config
    if state.vocab_size and state.vocab_size != config.vocab_size:
        config = config.replace(vocab_size=state.vocab_size)
    return config.flops_per_token(spec.seq_len) * state.rung.tokens


def fit_family(spec: LadderSpec, family: str, states: list[RungState]) -> FamilyFit:
    done = [s for s in states if s.status == "done" and not s.rung.is_target]
    target = next((s for s in states if s.rung.is_target), None)
    diverged = [s.rung.name for s in done if not math.isfinite(s.final_loss)]
    done = [s for s in done if math.isfinite(s.final_loss)]
    result = FamilyFit(family, spec.fit_size, done, target=target)
    if diverged:
        result.notes.append(f"left out of the fit, a non-finite validation loss: {', '.join(diverged)}")
    sizes = [s.rung.size(spec.fit_size) for s in done]
    if len(set(sizes)) < MIN_RUNGS:
        result.notes.append(f"{len(set(sizes))} finished rung sizes: L(N) needs at least {MIN_RUNGS}")
        return result
    losses = [s.final_loss for s in done]
    try:
        result.by_size = fit_power_law(sizes, losses)
        result.by_compute = fit_power_law([rung_compute(spec, s) for s in done], losses)
    except (ValueError, RuntimeError) as error:  # curve_fit's RuntimeError: no convergence
        result.by_size = result.by_compute = None
        result.notes.append(f"L(N) and L(C) not fitted: {error}")
        return result
    # L(N, D) only where the ladder file gives some rungs another budget: rounding to whole steps alone makes
    # every rung's tokens per parameter slightly different, which is no information about D.
    if len(done) >= 6 and len({s.rung.budget for s in done}) >= 2:
        try:
            result.by_size_and_tokens = fit_chinchilla(sizes, [s.rung.tokens for s in done], losses)
        except (ValueError, RuntimeError) as error:  # curve_fit's RuntimeError: no convergence
            result.notes.append(f"L(N, D) not fitted: {error}")
    return result


def multipliers(spec: LadderSpec, dense: FamilyFit, moe: FamilyFit) -> dict | None:
    """Each MoE rung's (and the target's) compute multiplier against the dense family's L(C)."""
    if dense.by_compute is None:
        return None
    rows = []
    low, high = min(rung_compute(spec, s) for s in dense.rungs), max(rung_compute(spec, s) for s in dense.rungs)
    for state in [*moe.rungs, *([moe.target] if moe.target and moe.target.final_loss is not None else [])]:
        c = rung_compute(spec, state)
        m = compute_multiplier(dense.by_compute, c, state.final_loss)
        dense_c = m * c
        rows.append({"rung": state.rung.name, "flops": c, "loss": state.final_loss, "multiplier": m,
                     "dense_flops_for_loss": dense_c,
                     "extrapolated": not (math.isfinite(dense_c) and low <= dense_c <= high)})
    # Over the rungs whose dense equivalent lies within the dense rungs' compute (the fit's own range).
    inside = [r["multiplier"] for r in rows if not r["extrapolated"] and r["multiplier"] > 0]
    geo = float(np.exp(np.mean(np.log(inside)))) if inside else None
    return {"dense": dense.family, "moe": moe.family, "rungs": rows, "geometric_mean": geo,
            "geometric_mean_over": len(inside)}


def analyse(spec: LadderSpec, states: dict[str, list[RungState]]) -> dict:
    """The fits, predictions and multipliers of a ladder, as the JSON it writes."""
    fits = {family: fit_family(spec, family, family_states) for family, family_states in states.items()}
    report: dict = {"ladder": str(spec.path), "out": str(spec.out), "fit_size": spec.fit_size,
                    "tokens_per_step": spec.tokens_per_step, "seq_len": spec.seq_len, "families": {}}
    for family, fit in fits.items():
        rows = []
        for state in states[family]:
            rung = state.rung
            rows.append({"rung": rung.name, "target": rung.is_target, "status": state.status,
                         "params": rung.size("total"), "active_params": rung.size("active"),
                         "non_embedding_params": rung.size("non_embedding"),
                         "active_non_embedding_params": rung.size("active_non_embedding"),
                         "tokens": rung.tokens, "steps": rung.steps, "flops": rung_compute(spec, state),
                         "final_val_loss": state.final_loss})
        entry = {"rungs": rows, "notes": fit.notes}
        if fit.by_size is not None:
            entry["fit_by_size"] = fit.by_size.as_dict()
            entry["fit_by_compute"] = fit.by_compute.as_dict()
        if fit.by_size_and_tokens is not None:
            entry["fit_by_size_and_tokens"] = fit.by_size_and_tokens.as_dict()
        prediction = fit.prediction(spec)
        if prediction is not None:
            entry["target"] = prediction
        report["families"][family] = entry
    dense = [f for f in fits.values() if not f.rungs or not f.rungs[0].rung.config.is_moe]
    moe = [f for f in fits.values() if f.rungs and f.rungs[0].rung.config.is_moe]
    report["compute_multipliers"] = [m for d in dense for e in moe if (m := multipliers(spec, d, e))]
    report["_fits"] = fits  # for the figure; not written
    return report


def write_report(report: dict, out: Path) -> Path:
    path = out / "ladder.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    public = {k: v for k, v in report.items() if not k.startswith("_")}
    path.write_text(json.dumps(public, indent=2, allow_nan=True) + "\n")
    return path
