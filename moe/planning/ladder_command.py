"""`moe ladder LADDER.yaml`: what it prints, in the order it runs (moe/planning/ladder.py does the work)."""

from __future__ import annotations

import math
import shlex

from moe.planning import ladder
from moe.planning.ladder import analyse, rung_compute, rung_dir, rung_state, train_rung, write_report
from moe.planning.ladder_spec import LadderSpec, load_ladder
from moe.planning.report import count


def format_rungs(spec: LadderSpec, states) -> str:
    header = (f"{'family':<8} {'rung':<12} {'params':>7} {'N':>7} {'tokens':>7} {'steps':>6} {'FLOPs':>9} "
              f"{'val loss':>8}  status")
    lines = [header, "-" * len(header)]
    for family, family_states in states.items():
        for state in family_states:
            rung = state.rung
            loss = f"{state.final_loss:.4f}" if state.final_loss is not None else "-"
            name = rung.name + (" *" if rung.is_target else "")
            lines.append(f"{family:<8} {name:<12} {count(rung.size('total')):>7} "
                         f"{count(rung.size(spec.fit_size)):>7} {count(rung.tokens):>7} {rung.steps:>6} "
                         f"{rung_compute(spec, state):>9.3g} {loss:>8}  {state.status}")
    lines.append(f"N: {spec.fit_size.replace('_', '-')} parameters; * held out of the fit; FLOPs: PaLM count "
                 f"(attention at {spec.seq_len} tokens) x tokens; {spec.tokens_per_step} tokens per step")
    return "\n".join(lines)


def format_fits(report: dict) -> str:
    lines = []
    for family, entry in report["families"].items():
        for note in entry["notes"]:
            lines.append(f"{family}: {note}")
        if "fit_by_size" in entry:
            n, c = entry["fit_by_size"], entry["fit_by_compute"]
            lines.append(f"{family}: L(N) = {n['E']:.3f} + {n['A']:.4g} / N^{n['alpha']:.3f}   alpha = "
                         f"{n['alpha']:.3f} ± {n['alpha_stderr']:.3f}, residual {n['residual_std']:.4f}")
            lines.append(f"{' ' * len(family)}  L(C) = {c['E']:.3f} + {c['A']:.4g} / C^{c['alpha']:.3f}   alpha = "
                         f"{c['alpha']:.3f} ± {c['alpha_stderr']:.3f}")
        if "fit_by_size_and_tokens" in entry:
            f = entry["fit_by_size_and_tokens"]
            lines.append(f"{' ' * len(family)}  L(N, D) = {f['E']:.3f} + {f['A']:.4g} / N^{f['alpha']:.3f} + "
                         f"{f['B']:.4g} / D^{f['beta']:.3f}")
        target = entry.get("target")
        if target:
            low, high = target["interval_95"]
            pad = " " * len(family)
            line = (f"{pad}  target {target['rung']}: predicted {target['predicted_loss']:.4f} [{low:.4f}, {high:.4f}] "
                    "(95%) by L(N)")
            if "predicted_loss_by_compute" in target:
                c_low, c_high = target["interval_95_by_compute"]
                line += f", {target['predicted_loss_by_compute']:.4f} [{c_low:.4f}, {c_high:.4f}] by L(C)"
            lines.append(line)
            if "actual_loss" in target:
                where = "inside" if target["inside_interval"] else "OUTSIDE"
                lines.append(f"{pad}  target {target['rung']}: trained {target['actual_loss']:.4f} "
                             f"({target['error']:+.4f} from L(N), {where} its interval)")
    for m in report["compute_multipliers"]:
        rows = ", ".join(f"{r['rung']} {r['multiplier']:.2f}x" + ("~" if r["extrapolated"] else "")
                         for r in m["rungs"])
        outside = sum(r["extrapolated"] for r in m["rungs"])
        geo = (f"geometric mean {m['geometric_mean']:.2f}x" if m["geometric_mean"] else "no rung") + \
            (f" over the {m['geometric_mean_over']} within the dense rungs' compute (~: beyond it)" if outside else "")
        lines.append(f"compute multiplier of {m['moe']} over {m['dense']} (dense FLOPs for the same loss / MoE FLOPs): "
                     f"{rows}; {geo}")
    return "\n".join(lines)


def run_ladder(path: str, out: str | None = None, fit_only: bool = False, dry_run: bool = False,
               families: list[str] | None = None) -> dict:
    spec = load_ladder(path, out)
    for family in families or []:
        if family not in spec.families:
            raise ValueError(f"--families: {path} has no family {family!r} (it has {', '.join(spec.families)})")
    states = {family: [rung_state(spec, rung) for rung in rungs] for family, rungs in spec.families.items()}
    print(f"moe ladder {path}: {sum(len(r) for r in spec.families.values())} rungs in {spec.out}/")
    print(format_rungs(spec, states))
    if dry_run:
        print()
        for rung in spec.rungs():
            print(f"# {rung.family}/{rung.name}: settings in {ladder.write_rung_file(spec, rung)}")
            print(shlex.join(["moe", "fit", *ladder.fit_args(spec, rung)]))
        return {}
    if not fit_only:
        # The rungs first, smallest compute first, then the targets: the fit can be read before the largest run.
        order = sorted((s for family_states in states.values() for s in family_states),
                       key=lambda s: (s.rung.is_target, rung_compute(spec, s)))
        todo = [s for s in order if (s.status in ("resume", "validate") or s.status == "new" and s.rung.train)
                and (families is None or s.rung.family in families)]
        for i, state in enumerate(todo, 1):
            rung = state.rung
            verb = {"resume": "resuming", "validate": "validating the final checkpoint of"}.get(state.status,
                                                                                              "training")
            print(f"\n[{i}/{len(todo)}] {verb} {rung.family}/{rung.name}: {count(rung.size('total'))} params, "
                  f"{count(rung.tokens)} tokens in {rung.steps} steps -> {rung_dir(spec, rung)}/")
            train_rung(spec, state)
        states = {family: [rung_state(spec, rung) for rung in rungs] for family, rungs in spec.families.items()}
        print()
        print(format_rungs(spec, states))
    report = analyse(spec, states)
    fits = report.pop("_fits")
    print()
    print(format_fits(report) or "nothing to fit yet")
    json_path = write_report(report, spec.out)
    print(f"wrote {json_path}")
    if any(s.final_loss is not None and math.isfinite(s.final_loss) for f in states.values() for s in f):
        from moe.planning.ladder_plot import draw_ladder

        print(f"wrote {draw_ladder(spec, states, fits, spec.out / 'ladder.png')}")
    return report
