"""moe ladder (moe/planning/ladder*.py): the ladder file is read and checked with errors naming the file and key;
each rung's budget becomes whole steps; rungs from a known power law give back its exponent, the held-out target
lands in its interval and a family shifted by a known compute factor gives that multiplier; a changed rung is
refused; and a real ladder of tiny rungs trains through the command line, resumes an interrupted rung to the same
loss, and skips what is done."""

import json
import math
import os
import shutil
import signal
import sys

import numpy as np
import pytest
import yaml
from PIL import Image

from moe.config import ModelConfig
from moe.errors import InputError
from moe.planning.ladder import analyse, rung_dir, rung_file, rung_header, rung_settings, rung_state, write_report
from moe.planning.ladder_plot import SIZE, draw_ladder
from moe.planning.ladder_spec import load_ladder, scale_config
from moe.presets import get_preset
from moe.train.preemption import CheckpointOnSigterm
from tests.cli_runs import ROOT, refused


def write_ladder(folder, **changes):
    spec = {
        "configs": [str(ROOT / "configs/data/stdlib.yaml")],
        "batch_size": 4, "seq_len": 64, "tokens_per_param": 2, "evals": 4, "val_batches": 2,
        "families": {"dense": {"model": "tiny-dense", "widths": [32, 64, 96, 128, 160], "depths": 2,
                               "target": {"width": 256, "depth": 2}}},
    }
    spec.update(changes)
    path = folder / "ladder.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_widths_and_depths_scale_the_base_config(tmp_path):
    spec = load_ladder(write_ladder(tmp_path), out=tmp_path / "out")
    rungs = spec.families["dense"]
    assert [r.name for r in rungs] == ["d32-l2", "d64-l2", "d96-l2", "d128-l2", "d160-l2", "d256-l2"]
    assert rungs[-1].is_target and not any(r.is_target for r in rungs[:-1])
    base = get_preset("tiny-dense")  # head_dim 32, 4 query heads per 2 key/value heads, FFN 352 at d_model 128
    shape = rungs[2].config
    assert (shape.n_heads, shape.n_kv_heads, shape.head_dim, shape.ffn_dim) == (3, 1, 32, 264)
    assert rungs[3].config.ffn_dim == base.ffn_dim and rungs[3].config.n_kv_heads == base.n_kv_heads
    for rung in rungs:
        # tokens: whole steps, a multiple of `evals`, covering tokens_per_param x active non-embedding parameters
        assert rung.steps % 4 == 0 and rung.tokens == rung.steps * 4 * 64
        budget = 2 * rung.size("active_non_embedding")
        assert budget <= rung.tokens < budget + 4 * 4 * 64
        assert rung.config.max_seq_len == 64
    assert scale_config(get_preset("tiny-moe"), 64, 3)["expert_ffn_dim"] == 128
    # The rung's model config as its fit gets it: the fields away from ModelConfig's defaults (a field added to
    # ModelConfig later leaves finished rungs alone), and ModelConfig rebuilt from them is the rung's.
    written = rung_settings(spec, d96 := rungs[2])["model"]["config"]
    assert "qk_norm" not in written and written["d_model"] == 96
    assert ModelConfig(**written, vocab_size=d96.config.vocab_size) == d96.config


def test_a_fixed_compute_budget_gives_every_rung_the_same_flops(tmp_path):
    spec = load_ladder(write_ladder(tmp_path, tokens_per_param=None, flops=1e11), out=tmp_path / "out")
    for rung in spec.families["dense"]:  # at least the budget, at most one rounding of the steps beyond it
        assert 1e11 <= rung.flops(64) < 1e11 + rung.config.flops_per_token(64) * 4 * 4 * 64


@pytest.mark.parametrize("changes, names", [
    ({"epochs": 3}, "ladder.yaml: epochs: unknown key"),
    ({"families": {"dense": {"model": "tiny-dense", "rungs": [{"d_modle": 64}]}}},
     "families.dense.rungs[0].d_modle: unknown key"),
    ({"tokens": 1e6}, "tokens: give one budget, not both tokens_per_param and tokens"),
    ({"flags": {"trainer.max_steps": 10}}, "flags.trainer.max_steps: is set by the ladder"),
    ({"configs": ["configs/data/nothere.yaml"]}, "configs[0]: no such config file"),
    ({"configs": [str(ROOT / "configs/model/tiny-moe.yaml")]}, "configs[0]: " + str(ROOT / "configs/model/tiny-moe.yaml")
     + " sets the model"),
    ({"families": {"dense": {"model": "tiny-dense", "widths": [40], "depths": 2}}},
     "families.dense.widths[0]: width 40 is not a multiple of the base config's head_dim 32"),
    ({"families": {"dense": {"model": "tiny-dense", "rungs": [{"n_heads": 3}]}}},
     "families.dense.rungs[0]: ModelConfig.d_model=128 is not divisible by ModelConfig.n_heads=3"),
    ({"families": {"dense": {"model": "no-such-preset", "widths": [32], "depths": 2}}}, "families.dense.model:"),
    ({"seq_len": 0}, "seq_len: must be > 0"),
    ({"fit_size": "embedding"}, "fit_size: 'embedding' is not one of"),
])
def test_bad_ladder_files_are_refused_naming_the_key(tmp_path, monkeypatch, capsys, changes, names):
    monkeypatch.chdir(tmp_path)
    path = write_ladder(tmp_path, **changes)
    message = refused(capsys, ["ladder", str(path), "--dry-run"])
    assert str(path) in message and names in message, message


def test_a_yaml_error_names_the_line(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("configs: []\nfamilies:\n  dense: {model: tiny-dense\n")
    assert f"{path}, line 4: not valid YAML" in refused(capsys, ["ladder", str(path)])


# ---- fits of rungs with known losses -----------------------------------------------------------------------------
E, A, ALPHA = 1.8, 60.0, 0.35


def fake_rung(spec, rung, loss, steps_done=None):
    """A rung folder as a finished (or interrupted) fit leaves it: its settings file, metrics.csv, hparams.yaml."""
    folder = rung_dir(spec, rung)
    folder.mkdir(parents=True)
    rung_file(spec, rung).write_text(rung_header(spec, rung) + yaml.safe_dump(rung_settings(spec, rung)))
    (folder / "hparams.yaml").write_text(yaml.safe_dump({"config": {"vocab_size": rung.config.vocab_size}}))
    steps_done = rung.steps if steps_done is None else steps_done
    rows = ["step,train/loss,val/loss"]
    for step in range(1, steps_done + 1):
        rows.append(f"{step - 1},{loss + 2.0 / step},")
        if step % (rung.steps // spec.evals) == 0:
            rows.append(f"{step - 1},,{loss + 1.0 / step ** 2}")
    # the final point is the loss given
    rows[-1] = f"{steps_done - 1},,{loss}" if steps_done == rung.steps else rows[-1]
    (folder / "metrics.csv").write_text("\n".join(rows) + "\n")


def states_of(spec):
    return {family: [rung_state(spec, rung) for rung in rungs] for family, rungs in spec.families.items()}


def test_rungs_from_a_power_law_give_back_its_exponent_and_the_target(tmp_path):
    spec = load_ladder(write_ladder(tmp_path), out=tmp_path / "out")
    rng = np.random.default_rng(0)
    for rung in spec.families["dense"]:
        n = rung.size("non_embedding")
        fake_rung(spec, rung, E + A / n ** ALPHA + rng.normal(0, 0.003))
    states = states_of(spec)
    assert [s.status for s in states["dense"]] == ["done"] * 6
    report = analyse(spec, states)
    fits = report.pop("_fits")
    entry = report["families"]["dense"]
    fit = entry["fit_by_size"]
    assert abs(fit["alpha"] - ALPHA) < max(3 * fit["alpha_stderr"], 0.02)
    target = entry["target"]
    truth = E + A / target["params"] ** ALPHA
    assert target["interval_95"][0] < truth < target["interval_95"][1]
    assert target["inside_interval"] and target["actual_loss"] == pytest.approx(truth, abs=0.02)
    written = json.loads(write_report(report, spec.out).read_text())
    assert written["families"]["dense"]["target"]["rung"] == "d256-l2"
    png = draw_ladder(spec, states, fits, spec.out / "ladder.png")
    assert Image.open(png).size == SIZE


def test_the_compute_multiplier_of_a_family_three_times_as_efficient(tmp_path):
    # Dense losses on a law in compute; the MoE rungs reach what the dense family would with 3x their compute.
    families = {"dense": {"model": "tiny-dense", "widths": [32, 64, 96, 128, 160], "depths": 2},
                "moe": {"model": "tiny-moe", "widths": [32, 64, 96, 128], "depths": 2}}
    spec = load_ladder(write_ladder(tmp_path, families=families), out=tmp_path / "out")

    def law(c):
        return 1.5 + 400.0 / c ** 0.12

    for family, rungs in spec.families.items():
        for rung in rungs:
            c = rung.flops(spec.seq_len)
            fake_rung(spec, rung, law(3 * c if family == "moe" else c))
    report = analyse(spec, states_of(spec))
    (multiplier,) = report["compute_multipliers"]
    assert multiplier["dense"] == "dense" and multiplier["moe"] == "moe"
    assert multiplier["geometric_mean"] == pytest.approx(3.0, rel=0.02)
    for row in multiplier["rungs"]:
        assert row["multiplier"] == pytest.approx(3.0, rel=0.05)


def test_too_few_rungs_are_reported_not_fitted(tmp_path):
    spec = load_ladder(write_ladder(tmp_path), out=tmp_path / "out")
    for rung in spec.families["dense"][:3]:
        fake_rung(spec, rung, 3.0)
    report = analyse(spec, states_of(spec))
    assert "fit_by_size" not in report["families"]["dense"]
    assert "3 finished rung sizes: L(N) needs at least 4" in report["families"]["dense"]["notes"][0]


def test_an_interrupted_rung_resumes_and_a_changed_one_is_refused(tmp_path):
    path = write_ladder(tmp_path)
    spec = load_ladder(path, out=tmp_path / "out")
    first = spec.families["dense"][0]
    fake_rung(spec, first, 3.0, steps_done=first.steps // 2)
    assert rung_state(spec, first).status == "new"  # no checkpoint: trained from the start
    (rung_dir(spec, first) / "checkpoints").mkdir()
    (rung_dir(spec, first) / "checkpoints" / "last.ckpt").write_bytes(b"")
    assert rung_state(spec, first).status == "resume"
    changed = load_ladder(write_ladder(tmp_path, tokens_per_param=4), out=tmp_path / "out")
    with pytest.raises(InputError) as error:
        rung_state(changed, changed.families["dense"][0])
    assert str(error.value).startswith(f"{path}: families.dense.widths[0]: {rung_dir(spec, first)} holds a run with "
                                       "other settings (settings.model.warmup_steps: ")
    assert str(rung_file(spec, first)) in str(error.value)
    # A changed flag, or a changed shared config file, is another run too.
    relabelled = load_ladder(write_ladder(tmp_path, flags={"model.lr": 0.01}), out=tmp_path / "out")
    with pytest.raises(InputError, match=r"shared.flags.model.lr: None then, 0.01 now"):
        rung_state(relabelled, relabelled.families["dense"][0])
    # A settings file whose run wrote nothing yet is only a plan: the new one replaces it.
    shutil.rmtree(rung_dir(spec, first))
    assert rung_state(changed, changed.families["dense"][0]).status == "new"
    assert "delete both" in str(error.value)


# ---- a real ladder through the command line ----------------------------------------------------------------------
def tiny_ladder(workdir):
    spec = {
        "configs": [str(ROOT / "configs/data/stdlib.yaml"), str(ROOT / "configs/trainer/cpu.yaml")],
        "flags": {"data.sources": [{"path": str(workdir / "corpus")}], "data.vocab_size": 320,
                  "data.num_workers": 0, "model.lr": 0.01},
        "batch_size": 4, "seq_len": 32, "tokens_per_param": 0.5, "evals": 2, "val_batches": 2,
        "families": {"dense": {"model": "tiny-dense", "rungs": [{"width": w, "depth": 1, "head_dim": 8}
                                                               for w in (16, 24, 32, 40)],
                               "target": {"width": 48, "depth": 1, "head_dim": 8}}},
    }
    path = workdir / "tiny-ladder.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_a_ladder_trains_resumes_and_skips_through_the_command_line(workdir, capsys):
    import cli

    path = tiny_ladder(workdir)
    # --dry-run: each rung's command, its settings file written, nothing trained.
    cli.main(["ladder", str(path), "--dry-run"])
    out = capsys.readouterr().out
    assert "moe fit --config" in out and "--config runs/ladder/tiny-ladder/dense/d16-l1.yaml" in out
    assert (workdir / "runs/ladder/tiny-ladder/dense/d16-l1.yaml").is_file()
    assert not (workdir / "runs/ladder/tiny-ladder/dense/d16-l1").exists()
    cli.main(["ladder", str(path)])
    out = capsys.readouterr().out
    report = json.loads((workdir / "runs/ladder/tiny-ladder/ladder.json").read_text())
    rows = report["families"]["dense"]["rungs"]
    assert [r["status"] for r in rows] == ["done"] * 5 and all(math.isfinite(r["final_val_loss"]) for r in rows)
    assert report["families"]["dense"]["target"]["rung"] == "d48-l1"
    assert "actual_loss" in report["families"]["dense"]["target"]
    assert "L(N) = " in out and "target d48-l1: predicted" in out
    assert Image.open(workdir / "runs/ladder/tiny-ladder/ladder.png").size == SIZE
    target_dir = workdir / "runs/ladder/tiny-ladder/dense/d48-l1"
    # Each rung is an ordinary run: its own folder, config, metrics and checkpoints.
    assert {"metrics.csv", "config.yaml", "hparams.yaml", "checkpoints"} <= {p.name for p in target_dir.iterdir()}
    assert (target_dir.parent / "d48-l1.yaml").is_file()

    # Train the target again, preempted (SIGTERM) after its first validation: the run saves and exits, the ladder
    # stops naming it; run again, the ladder resumes it from that checkpoint to the loss it had reached unbroken.
    # Then once more, preempted after its last step, before its final validation: the ladder validates that
    # checkpoint (fit would return at once, its steps done) and gets the same loss.
    reached = rows[-1]["final_val_loss"]
    steps = rows[-1]["steps"]
    record = CheckpointOnSigterm.on_train_batch_end
    for stop_at, verb in ((steps // 2, "resuming"), (steps, "validating the final checkpoint of")):
        shutil.rmtree(target_dir)
        (target_dir.parent / "d48-l1.yaml").unlink()

        def preempted(self, trainer, pl_module, *args, stop_at=stop_at):
            if pl_module.model_config.name == "d48-l1" and trainer.global_step == stop_at:
                os.kill(os.getpid(), signal.SIGTERM)
            record(self, trainer, pl_module, *args)

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(CheckpointOnSigterm, "on_train_batch_end", preempted)
            message = refused(capsys, ["ladder", str(path)])
        assert "rung dense/d48-l1 stopped (exit status 143)" in message and "run the ladder again" in message
        cli.main(["ladder", str(path)])
        out = capsys.readouterr().out
        assert f"[1/1] {verb} dense/d48-l1" in out
        again = json.loads((workdir / "runs/ladder/tiny-ladder/ladder.json").read_text())
        assert again["families"]["dense"]["rungs"][-1]["final_val_loss"] == pytest.approx(reached, abs=1e-5)

    # Everything done: nothing trains, the same fit.
    cli.main(["ladder", str(path)])
    out = capsys.readouterr().out
    assert "training" not in out and "resuming" not in out
    third = json.loads((workdir / "runs/ladder/tiny-ladder/ladder.json").read_text())
    assert third["families"]["dense"]["fit_by_size"] == again["families"]["dense"]["fit_by_size"]


def test_rungs_that_vary_the_tokens_get_chinchillas_law_and_an_untrained_target_is_only_predicted(tmp_path):
    # Six sizes at 2 tokens per parameter and the same six at 8: L(N, D) = E + A/N^a + B/D^b is fitted to all twelve.
    rungs = [{"width": w, "depth": 2, "name": f"d{w}-k{k}", "tokens_per_param": k}
             for w in (32, 64, 96, 128, 160, 192) for k in (2, 8)]
    families = {"dense": {"model": "tiny-dense", "rungs": rungs,
                          "target": {"width": 256, "depth": 2, "train": False}}}
    spec = load_ladder(write_ladder(tmp_path, families=families), out=tmp_path / "out")

    def law(n, d):
        return 1.7 + 300.0 / n ** 0.4 + 200.0 / d ** 0.3

    for rung in spec.families["dense"][:-1]:
        fake_rung(spec, rung, law(rung.size("non_embedding"), rung.tokens))
    states = states_of(spec)
    assert states["dense"][-1].status == "skipped"
    report = analyse(spec, states)
    entry = report["families"]["dense"]
    chinchilla = entry["fit_by_size_and_tokens"]
    assert chinchilla["alpha"] == pytest.approx(0.4, abs=0.02) and chinchilla["beta"] == pytest.approx(0.3, abs=0.02)
    target = entry["target"]
    assert "actual_loss" not in target
    # L(N) at the target's size, its tokens at 2 per parameter as the rungs of the default budget
    truth = law(target["params"], spec.families["dense"][-1].tokens)
    assert target["interval_95"][0] < truth < target["interval_95"][1]


def test_one_budget_for_all_rungs_fits_no_chinchilla_law(tmp_path):
    # Rounding to whole steps makes every rung's tokens per parameter a little different: that is not a D axis.
    families = {"dense": {"model": "tiny-dense", "widths": [32, 64, 96, 128, 160, 192, 224], "depths": 2}}
    spec = load_ladder(write_ladder(tmp_path, families=families), out=tmp_path / "out")
    ratios = {r.tokens / r.size("active_non_embedding") for r in spec.families["dense"]}
    assert len(ratios) > 1
    for rung in spec.families["dense"]:
        fake_rung(spec, rung, E + A / rung.size("non_embedding") ** ALPHA)
    entry = analyse(spec, states_of(spec))["families"]["dense"]
    assert "fit_by_size" in entry and "fit_by_size_and_tokens" not in entry


def test_a_diverged_rung_is_left_out_and_named(tmp_path):
    spec = load_ladder(write_ladder(tmp_path), out=tmp_path / "out")
    rungs = spec.families["dense"]
    for rung in rungs:
        fake_rung(spec, rung, E + A / rung.size("non_embedding") ** ALPHA)
    metrics = rung_dir(spec, rungs[1]) / "metrics.csv"
    lines = metrics.read_text().splitlines()
    lines[-1] = lines[-1].rsplit(",", 1)[0] + ",nan"
    metrics.write_text("\n".join(lines) + "\n")
    entry = analyse(spec, states_of(spec))["families"]["dense"]
    assert entry["notes"] == ["left out of the fit, a non-finite validation loss: d64-l2"]
    assert "fit_by_size" in entry  # from the four others


def test_trainer_settings_in_the_configs_count_in_the_tokens_per_step(tmp_path):
    trainer = tmp_path / "two-devices.yaml"
    trainer.write_text("trainer:\n  devices: 1\n  accumulate_grad_batches: 3\ndata:\n  vocab_size: 320\n")
    spec = load_ladder(write_ladder(tmp_path, configs=[str(trainer)]), out=tmp_path / "out")
    assert spec.tokens_per_step == 4 * 64 * 3
    assert {r.config.vocab_size for r in spec.rungs()} == {320}  # the data's vocabulary, as the fit links it
    trainer.write_text("trainer:\n  devices: -1\n")
    with pytest.raises(InputError, match=r"configs\[0\] \(.*two-devices.yaml\): trainer.devices: -1: a ladder "
                                         r"counts the tokens of each step"):
        load_ladder(write_ladder(tmp_path, configs=[str(trainer)]))
    # Several devices of one node: each step holds every process's batch. Several nodes: refused, naming the key.
    trainer.write_text("trainer:\n  devices: 2\n")
    spec = load_ladder(write_ladder(tmp_path, configs=[str(trainer)]), out=tmp_path / "out")
    assert (spec.tokens_per_step, spec.processes) == (4 * 64 * 2, 2)
    with pytest.raises(InputError, match=r"flags.trainer.num_nodes: 2: a ladder trains its rungs on one node"):
        load_ladder(write_ladder(tmp_path, flags={"trainer.num_nodes": 2}))
    # What sizes the step is the ladder's: a family or a rung may not change it.
    family = {"model": "tiny-dense", "widths": [32], "depths": 2, "flags": {"trainer.devices": 4}}
    with pytest.raises(InputError, match=r"families.dense.flags.trainer.devices: sizes the step of every rung"):
        load_ladder(write_ladder(tmp_path, families={"dense": family}))
    rung = {"width": 32, "depth": 2, "flags": {"trainer.accumulate_grad_batches": 2}}
    with pytest.raises(InputError, match=r"rungs\[0\].flags.trainer.accumulate_grad_batches: sizes the step"):
        load_ladder(write_ladder(tmp_path, families={"dense": {"model": "tiny-dense", "rungs": [rung]}}))


def test_a_ladder_on_two_devices_runs_each_rung_in_a_child_process(workdir):
    """trainer.devices 2 (gloo processes on the CPU, as GPUs of a node): each rung is `python cli.py fit` in a child
    process, from which Lightning starts the second; every step holds both processes' batches."""
    import cli

    path = tiny_ladder(workdir)
    spec = yaml.safe_load(path.read_text())
    spec["flags"]["trainer.devices"] = 2
    spec["families"]["dense"] = {"model": "tiny-dense", "rungs": [{"width": 16, "depth": 1, "head_dim": 8}]}
    path.write_text(yaml.safe_dump(spec))
    cli.main(["ladder", str(path)])
    report = json.loads((workdir / "runs/ladder/tiny-ladder/ladder.json").read_text())
    (row,) = report["families"]["dense"]["rungs"]
    assert row["status"] == "done" and math.isfinite(row["final_val_loss"])
    assert row["tokens"] == row["steps"] * 4 * 32 * 2
    # The throughput monitor counts the tokens of all processes: 2 x batch 4 x 32 tokens per optimizer step.
    header, *lines = (workdir / "runs/ladder/tiny-ladder/dense/d16-l1/metrics.csv").read_text().splitlines()
    columns = header.split(",")
    seen = [(int(values[columns.index("step")]), float(values[columns.index("train/tokens_seen")]))
            for values in (line.split(",") for line in lines) if values[columns.index("train/tokens_seen")]]
    assert seen and all(tokens == (step + 1) * 4 * 32 * 2 for step, tokens in seen), seen


def test_a_child_rung_gets_the_sigterm_sent_to_the_ladder(tmp_path):
    """A scheduler that signals only the ladder's process: the child (the rung's fit, here a stand-in) is sent the
    SIGTERM, saves and exits 143, and the ladder reports that status."""
    import threading
    import time

    from moe.planning.ladder import run_command

    ready, saved = tmp_path / "ready", tmp_path / "saved"
    child = (f"import signal, sys, time, pathlib\n"
             f"def stop(*_):\n    pathlib.Path({str(saved)!r}).write_text('checkpoint')\n    sys.exit(143)\n"
             f"signal.signal(signal.SIGTERM, stop)\npathlib.Path({str(ready)!r}).write_text('')\ntime.sleep(60)\n")

    def preempt():
        while not ready.exists():
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)  # to the ladder only

    threading.Thread(target=preempt, daemon=True).start()
    assert run_command([], program=[sys.executable, "-c", child]) == 143
    assert saved.read_text() == "checkpoint"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the ladder's own handling is back


@pytest.mark.parametrize("name", ["cpu", "gpu-node"])
def test_the_shipped_ladders_load(name, monkeypatch):
    monkeypatch.chdir(ROOT)  # their config paths are relative to the repository, as the README runs them
    spec = load_ladder(ROOT / f"configs/ladder/{name}.yaml", out=ROOT / "runs/ladder" / name)
    rungs = spec.rungs()
    assert sum(r.is_target for r in rungs) == 1 and all(r.steps > 0 for r in rungs)
    if name == "gpu-node":  # 8 GPUs x 32 sequences x 2048 tokens per step, SmolLM's tokenizer
        assert (spec.processes, spec.tokens_per_step) == (8, 8 * 32 * 2048)
        assert {r.config.vocab_size for r in rungs} == {49152} and all(r.config.tie_embeddings for r in rungs)
        sizes = [r.size("non_embedding") for r in rungs]
        assert sizes == sorted(sizes) and sizes[-1] > 2 * sizes[-2]  # the target beyond the fitted range
