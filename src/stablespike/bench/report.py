"""Tables, plots and the Markdown/HTML report of a depth-scaling sweep (rendering only)."""
from __future__ import annotations

import base64
import html
import math
import os
from typing import Dict, List, Tuple

import numpy as np

from ..rules import Thresholds

_CSS = ("body{font-family:sans-serif;margin:2em;max-width:72em}"
        "table{border-collapse:collapse;margin:1em 0}"
        "th,td{border:1px solid #bbb;padding:.3em .7em;text-align:right}"
        "th{background:#eee}td:first-child,th:first-child{text-align:center}"
        "img{max-width:100%;display:block;margin:1em 0}"
        "summary{font-size:1.5em;font-weight:bold;margin:.8em 0;cursor:pointer}")
COLORS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860")


def _final(run: dict, key: str):
    if run["status"] != "OK" or not run["history"]:
        return None
    value = run["history"][-1].get(key)  # fields added later are absent from older run files
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def _stats(values: List) -> Tuple[float, float, int]:
    v = [x for x in values if x is not None]
    if not v:
        return math.nan, math.nan, 0
    return float(np.mean(v)), float(np.std(v)), len(v)


def summarize(results: Dict) -> List[dict]:
    """One row per depth: per variant (vanilla, lyapunov, calibrated, ...), mean and spread over
    seeds of the final test accuracy, and the exponent, gradient norm and condition number."""
    depths = sorted({int(d) for m in results.values() for d in m})
    rows = []
    for d in depths:
        row = {"depth": d}
        for m in results:
            runs = list(results[m].get(str(d), {}).values())
            acc = [_final(r, "test_acc") for r in runs]
            row[f"{m}_acc"], row[f"{m}_acc_sd"], row[f"{m}_n"] = _stats(acc)
            row[f"{m}_failed"] = sum(1 for r in runs if r["status"] != "OK")
            row[f"{m}_lyap"] = _stats([_final(r, "lyapunov") for r in runs])[0]
            row[f"{m}_grad"] = _stats([_final(r, "grad_norm") for r in runs])[0]
            row[f"{m}_cond"] = _stats([_final(r, "grad_condition_eff") for r in runs])[0]
        rows.append(row)
    return rows


def _pm(mean: float, sd: float, n: int) -> str:
    return "FAILED" if n == 0 else f"{mean:.3f}±{sd:.3f}"


def _pair(variants: List[str]) -> Tuple[str, str]:
    """The seed's two columns: the first init's plain and regularized variants ('vanilla' and
    'lyapunov' with the default init, e.g. 'calibrated' and 'calibrated+lyapunov' otherwise)."""
    return (variants[0], variants[1]) if len(variants) > 1 else (variants[0], variants[0])


def table_cells(rows: List[dict], variants: List[str]) -> Tuple[List[str], List[List[str]]]:
    """Seed 002's summary table as (titles, rows of cells): mean ± spread over seeds, plus one
    accuracy column per further variant (e.g. calibrated, calibrated+lyapunov)."""
    base, reg = _pair(variants)
    extra = [v for v in variants if v not in (base, reg)]
    names = ("Vanilla", "Lyapunov", "Van", "Lyap") if base == "vanilla" else (base, reg, base, reg)
    titles = (["Depth", f"{names[0]} Acc", f"{names[1]} Acc", "Δ Acc", "Lyap λ", f"{names[2]} ∇norm",
               f"{names[3]} ∇norm", f"{names[2]} κ_eff"] + [f"{v} Acc" for v in extra])
    cells = []
    for r in rows:
        get = lambda k: r.get(k, math.nan)  # noqa: E731
        pm = lambda v: (_pm(get(f"{v}_acc"), get(f"{v}_acc_sd"), r.get(f"{v}_n", 0))  # noqa: E731
                        if r.get(f"{v}_n", 0) or r.get(f"{v}_failed", 0) else "not run yet")
        cells.append([str(r["depth"]), pm(base), pm(reg), f"{get(f'{reg}_acc') - get(f'{base}_acc'):+.3f}",
                      f"{get(f'{reg}_lyap'):.3f}", f"{get(f'{base}_grad'):.2e}", f"{get(f'{reg}_grad'):.2e}",
                      f"{get(f'{base}_cond'):.1e}"] + [pm(v) for v in extra])
    return titles, cells


def summary_table(rows: List[dict], variants: List[str]) -> str:
    """:func:`table_cells` as fixed-width text."""
    titles, cells = table_cells(rows, variants)
    widths = [max(len(c) for c in column) + 2 for column in zip(titles, *cells)]
    return "\n".join("".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in [titles] + cells)


def html_table(rows: List[dict], variants: List[str]) -> str:
    """:func:`table_cells` as an HTML table (every cell escaped)."""
    titles, cells = table_cells(rows, variants)
    head = "".join(f"<th>{html.escape(t)}</th>" for t in titles)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in line) + "</tr>" for line in cells)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def observations(rows: List[dict], variants: List[str]) -> List[str]:
    """Seed 002's gradient-health analysis and key observations, with the numbers."""
    base, reg = _pair(variants)
    notes = []
    for r in rows:
        cond, th = r.get(f"{base}_cond", math.nan), Thresholds()  # the profiler's own thresholds
        if cond > th.condition_critical:
            notes.append(f"Depth {r['depth']}: {base} has ill-conditioned gradients (effective κ = "
                         f"{cond:.1e} > {th.condition_critical:.0e})")
        elif cond > th.condition_warning:
            notes.append(f"Depth {r['depth']}: {base} has moderately ill-conditioned gradients "
                         f"(effective κ = {cond:.1e} > {th.condition_warning:.0e})")
        for m in variants:
            if r[f"{m}_failed"]:
                notes.append(f"Depth {r['depth']}: {r[f'{m}_failed']} {m} run(s) diverged")
    if len(rows) >= 2:
        lo, hi = rows[0], rows[-1]
        for v in variants:
            change = hi[v + '_acc'] - lo[v + '_acc']
            if not math.isnan(change):  # both depths finished
                notes.append(f"{v} {lo['depth']}→{hi['depth']} layers: {change:+.3f} accuracy change")
    if base != reg:
        notes.append(_penalty_verdict(rows, base, reg))
    return notes


def _penalty_verdict(rows: List[dict], base: str, reg: str) -> str:
    """Depth by depth, whether the regularized variant's accuracy differs from the plain one's by
    more than twice their combined spread over seeds (and at least 0.01): helps, hurts, or neither."""
    verdict = {"helps": [], "hurts": [], "no difference beyond the seed spread": []}
    for r in rows:
        diff = r.get(f"{reg}_acc", math.nan) - r.get(f"{base}_acc", math.nan)
        if math.isnan(diff):
            continue
        noise = max(0.01, 2 * math.hypot(r.get(f"{base}_acc_sd", 0.0), r.get(f"{reg}_acc_sd", 0.0)))
        kind = "helps" if diff > noise else "hurts" if diff < -noise else "no difference beyond the seed spread"
        verdict[kind].append(f"{r['depth']} ({diff:+.3f})")
    said = [f"{kind} at depth {', '.join(d)}" for kind, d in verdict.items() if d]
    return f"{reg} against {base}: " + ("; ".join(said) if said else "no depth with both finished")


# What to do about each finding of a failing run. Silence and vanishing gradients have a cure measured
# in this repository (docs/studies/digits-mnist1d.md); the others carry the profiler's own advice.
_WAKE = ("--init calibrated --surrogate_slope 1: every layer fires at --target_rate before training and "
         "the wide surrogate lets the gradient through (measured on digits, 14-layer spiking MLP, 3 "
         "seeds, 20 epochs: 0.102±0.001 with the seeds' settings, 0.935±0.008 with both; "
         "docs/studies/digits-mnist1d.md)")
PRESCRIPTIONS = {
    "dead_neurons": _WAKE, "silent_layer": _WAKE, "gradient_vanishing": _WAKE, "voltage_collapse": _WAKE,
    "saturated_neurons": "--init calibrated (every layer starts at --target_rate; not measured as a cure "
                         "of saturation here)",
    "gradient_explosion": "a lower --lr, or a lower --grad_clip (not measured here)",
    "non_finite": "a lower --lr and --grad_clip, and a check of the data for NaN (not measured here)",
    "chaotic_dynamics": "the Lyapunov penalty toward a negative target (--lambda_reg, --lambda_target; "
                        "not measured as a cure here)",
    "ill_conditioned_gradients": "a lower --lr (not measured here)",
}


_LONGER = ("the measured cure (calibrated init, surrogate slope <= 1) is already applied: train longer "
           "or on more data (the 14-layer MLP on digits reached 0.84 after 8 epochs, 0.935 after 20)")


def _failing_runs(results: Dict, below: float):
    """(variant, depth, seed, accuracy or None, run record) of each run that ended below ``below``
    test accuracy or diverged."""
    for variant, depths in results.items():
        for depth, runs in sorted(depths.items(), key=lambda kv: int(kv[0])):
            for seed, run in runs.items():
                acc = _final(run, "test_acc")
                if acc is None or acc < below:
                    yield variant, depth, seed, acc, run


def prescriptions(results: Dict, surrogate_slope: float, below: float = 0.2) -> List[str]:
    """For the failing runs, grouped by what to do: the prescription, then the runs it is for.
    A run that already had the measured cure (calibrated, ``surrogate_slope <= 1``) is told so."""
    runs_for: Dict[str, List[str]] = {}
    for variant, depth, seed, acc, run in _failing_runs(results, below):
        v = run.get("verdict")
        categories = {f.split()[1] for f in v["findings"] if len(f.split()) > 1} if v else {"non_finite"}
        cured = run.get("init") == "calibrated" and surrogate_slope <= 1
        wake = _LONGER if cured else _WAKE if surrogate_slope > 1 else \
            _WAKE.replace(" --surrogate_slope 1:", " (the runs had --surrogate_slope 1 already):", 1)
        todo = [wake if PRESCRIPTIONS[c] == _WAKE else PRESCRIPTIONS[c]
                for c in sorted(categories) if c in PRESCRIPTIONS]
        for what in dict.fromkeys(todo):
            runs_for.setdefault(what, {}).setdefault(variant, {}).setdefault(depth, []).append(seed)
    return [f"What to do for {_runs_text(runs)}: {what}" for what, runs in runs_for.items()]


def _runs_text(runs: Dict[str, Dict[str, List[str]]]) -> str:
    """``{variant: {depth: [seeds]}}`` as 'vanilla at depth 8 (seeds 0, 1), 16 (seed 2); ...'."""
    def seeds(s):
        return f"seed{'s' if len(s) > 1 else ''} {', '.join(s)}"
    return "; ".join(f"{variant} at depth " + ", ".join(f"{d} ({seeds(s)})" for d, s in depths.items())
                     for variant, depths in runs.items())


def failing_verdicts(results: Dict, below: float = 0.2) -> List[str]:
    """The profiler's verdict on each run that ended below ``below`` test accuracy (or diverged)."""
    notes = []
    for variant, depth, seed, acc, run in _failing_runs(results, below):
        v = run.get("verdict")
        found = "; ".join(sorted(set(v["findings"]))[:4]) if v else "no profile (diverged)"
        score = f"health {v['health_score']:.0f}/100: " if v else ""
        notes.append(f"failing run {variant} depth {depth} seed {seed} (acc "
                     f"{'-' if acc is None else f'{acc:.3f}'}): {score}{found}")
    return notes


def _png(fig) -> bytes:
    import io
    import matplotlib.pyplot as plt
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _legend_outside(ax) -> None:
    """The legend to the right of the axes, never over the data; none when nothing is plotted."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)


def _integer_ticks(ax) -> None:
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def plots(results: Dict, rows: List[dict]) -> Dict[str, bytes]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    out = {}
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for m, color in zip(results, COLORS):
        d = [r["depth"] for r in rows if r[f"{m}_n"]]
        ax.errorbar(d, [r[f"{m}_acc"] for r in rows if r[f"{m}_n"]],
                    yerr=[r[f"{m}_acc_sd"] for r in rows if r[f"{m}_n"]], marker="o", capsize=3, label=m, color=color)
    ax.set_xlabel("depth (layers)")
    ax.set_ylabel("test accuracy")
    ax.set_title("test accuracy vs depth (mean ± sd over seeds)", fontsize=10)
    _integer_ticks(ax)
    _legend_outside(ax)
    out["accuracy_vs_depth.png"] = _png(fig)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    for m, style in zip(results, ("-", "--", "-.", ":", "-", "--")):
        for d, runs in sorted(results.get(m, {}).items(), key=lambda kv: int(kv[0])):
            run = next(iter(runs.values()))
            ep = [h["epoch"] for h in run["history"]]
            if m.endswith("lyapunov"):
                axes[0].plot(ep, [h["lyapunov"] for h in run["history"]], style, label=f"{m} d{d}")
            axes[1].semilogy(ep, [h["grad_norm"] for h in run["history"]], style, label=f"{m} d{d}")
    axes[0].set_title("Lyapunov exponent over epochs (regularized runs)", fontsize=10)
    axes[1].set_title("gradient norm over epochs", fontsize=10)
    for ax in axes:
        ax.set_xlabel("epoch")
        _integer_ticks(ax)
        _legend_outside(ax)
    fig.subplots_adjust(wspace=0.6)
    out["dynamics_over_epochs.png"] = _png(fig)
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for m, style in zip(results, ("-o", "--s", "-^", ":v", "-d", "--x")):
        for d, runs in sorted(results.get(m, {}).items(), key=lambda kv: int(kv[0])):
            rates = next(iter(runs.values())).get("layer_rates")
            if rates:
                ax.plot(range(1, len(rates) + 1), list(rates.values()), style, label=f"{m} d{d}", markersize=3)
    ax.set_xlabel("layer")
    ax.set_ylabel("firing rate (test)")
    ax.set_yscale("symlog", linthresh=1e-3)
    from matplotlib.ticker import FixedLocator, FormatStrFormatter
    ax.yaxis.set_major_locator(FixedLocator([0, 1e-3, 1e-2, 0.03, 0.1, 0.3, 1]))
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.yaxis.set_minor_locator(FixedLocator([]))
    ax.set_ylim(0, 1)  # rates: the whole range, so every tick shows
    ax.set_title("per-layer firing rate after training", fontsize=10)
    _integer_ticks(ax)
    _legend_outside(ax)
    out["layer_rates.png"] = _png(fig)
    return out


def write_report(run_dir: str) -> str:
    """Re-render the tables, plots, ``report.md`` and ``report.html`` of a sweep directory; returns
    the text summary. The numbers come from the run files (``runs/*.json``, the source of truth);
    ``results.json`` and ``results_seeds.json`` are made again from them, and one that says
    something else (edited by hand, corrupt) is refused with an error naming it."""
    from .depth_scaling import SweepConfig, load_sweep, run_keys
    from ..runfiles import write_atomic
    config, results = load_sweep(run_dir)
    rows = summarize(results)
    variants = list(results)
    table, notes = summary_table(rows, variants), observations(rows, variants)
    expected = len(run_keys(SweepConfig.from_dict(config, device="cpu")))
    finished = sum(len(by_seed) for by_depth in results.values() for by_seed in by_depth.values())
    if finished < expected:  # a killed or running sweep: what exists is rendered
        notes.insert(0, f"{finished} of {expected} runs finished: a partial sweep (--resume finishes it)")
    todo, failing = prescriptions(results, config["surrogate_slope"]), failing_verdicts(results)
    images = plots(results, rows)
    for name, data in images.items():
        write_atomic(os.path.join(run_dir, name), lambda f, data=data: f.write(data))
    head = _headline(config)
    sections = [("Observations", notes), ("What to do", todo), ("Failing runs: the profiler's findings", failing)]
    md = [f"# {head}", "", "```", table, "```", ""]
    for title, lines in sections:
        md += [f"## {title}", ""] + [f"- {n}" for n in lines] + [""] if lines else []
    md += [f"![{n}]({n})" for n in images]
    write_atomic(os.path.join(run_dir, "report.md"), lambda f: f.write(("\n".join(md) + "\n").encode()))
    page = _page(head, html_table(rows, variants), sections, images)
    write_atomic(os.path.join(run_dir, "report.html"), lambda f: f.write(page.encode("utf-8")))
    notes = notes + todo + failing
    return f"{head}\n{table}\n" + "\n".join(notes)


def _headline(config: Dict) -> str:
    """What was run, in one line: data (and subsets), model and its size, steps, epochs, seeds."""
    seeds = ", ".join(str(s) for s in config["seeds"])
    steps = ("sequence input, one value per step" if config["train"]["encoder"] == "sequence"
             else f"T={config['train']['T']}")
    size = (f"{config['width']} units per layer" if config["model"] == "mlp"
            else f"{config['width']} base channels")
    subsets = "".join(f", {part} subset {config[f'{part}_subset']}" for part in ("train", "test")
                      if config.get(f"{part}_subset"))
    return (f"Depth scaling on {config['dataset']}{subsets} with the spiking {config['model'].upper()} "
            f"({size}, {steps}, {config['train']['epochs']} epoch{'s' * (config['train']['epochs'] != 1)}, "
            f"seed{'s' * (len(config['seeds']) != 1)} {seeds}, "
            f"reg {config['train']['reg_type']}, init {', '.join(config['inits'])}, "
            f"surrogate slope {config['surrogate_slope']:g})")


def _page(head: str, table_html: str, sections, images: Dict[str, bytes]) -> str:
    """report.html: every string from the sweep's files escaped; the failing runs' findings folded."""
    esc = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>depth scaling</title>"
             f"<style>{_CSS}</style></head><body><h1>{esc(head)}</h1>{table_html}"]
    for title, lines in sections:
        if not lines:
            continue
        items = "<ul>" + "".join(f"<li>{esc(n)}</li>" for n in lines) + "</ul>"
        parts.append(f"<details><summary>{esc(title)} ({len(lines)})</summary>{items}</details>"
                     if title.startswith("Failing") else f"<h2>{esc(title)}</h2>{items}")
    parts += [f"<img alt='{esc(n)}' src='data:image/png;base64,{base64.b64encode(b).decode()}'>"
              for n, b in images.items()]
    return "".join(parts) + "</body></html>"
