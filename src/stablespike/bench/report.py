"""Tables, plots and the Markdown/HTML report of a depth-scaling sweep (rendering only)."""
from __future__ import annotations

import base64
import html
import math
import os
from typing import Dict, List, Tuple

import numpy as np

from ..rules import Thresholds

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


def summary_table(rows: List[dict], variants: List[str]) -> str:
    """Seed 002's summary table (mean ± spread over seeds), plus one accuracy column per further
    variant (e.g. calibrated, calibrated+lyapunov)."""
    base, reg = _pair(variants)
    extra = [v for v in variants if v not in (base, reg)]
    names = ("Vanilla", "Lyapunov", "Van", "Lyap") if base == "vanilla" else (base, reg, base, reg)
    titles = [f"{names[0]} Acc", f"{names[1]} Acc", f"{names[2]} ∇norm", f"{names[3]} ∇norm", f"{names[2]} κ"]
    w = [max(13, len(titles[0]) + 1), max(13, len(titles[1]) + 1), max(10, len(titles[2]) + 1),
         max(10, len(titles[3]) + 1), max(9, len(titles[4]) + 1)]
    head = (f"{'Depth':<6} {titles[0]:<{w[0]}} {titles[1]:<{w[1]}} {'Δ Acc':<8} {'Lyap λ':<9} "
            f"{titles[2]:<{w[2]}} {titles[3]:<{w[3]}} {titles[4]:<{w[4]}}"
            ) + "".join(f" {v + ' Acc':<22}" for v in extra)
    lines = [head]
    for r in rows:
        get = lambda k: r.get(k, math.nan)  # noqa: E731
        diff = get(f"{reg}_acc") - get(f"{base}_acc")
        line = (f"{r['depth']:<6} {_pm(get(f'{base}_acc'), get(f'{base}_acc_sd'), r.get(f'{base}_n', 0)):<{w[0]}} "
                f"{_pm(get(f'{reg}_acc'), get(f'{reg}_acc_sd'), r.get(f'{reg}_n', 0)):<{w[1]}} "
                f"{diff:<+8.3f} {get(f'{reg}_lyap'):<9.3f} {get(f'{base}_grad'):<{w[2]}.2e} "
                f"{get(f'{reg}_grad'):<{w[3]}.2e} {get(f'{base}_cond'):<{w[4]}.1e}")
        line += "".join(f" {_pm(r[v + '_acc'], r[v + '_acc_sd'], r[v + '_n']):<22}" for v in extra)
        lines.append(line)
    return "\n".join(lines)


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
        plain = hi.get(f"{base}_acc", math.nan) - lo.get(f"{base}_acc", math.nan)
        lyap = hi.get(f"{reg}_acc", math.nan) - lo.get(f"{reg}_acc", math.nan)
        for v in variants:
            notes.append(f"{v} {lo['depth']}→{hi['depth']} layers: {hi[v + '_acc'] - lo[v + '_acc']:+.3f} accuracy change")
        if lyap > plain + 0.02:
            notes.append("Lyapunov regularization scales better with depth here")
        elif lyap > plain:
            notes.append("Lyapunov shows a slight improvement in depth scaling (within 0.02)")
        else:
            notes.append("No benefit from Lyapunov regularization on this data set and depth range")
    return notes


def failing_verdicts(results: Dict, below: float = 0.2) -> List[str]:
    """The profiler's verdict on each run that ended below ``below`` test accuracy (or diverged)."""
    notes = []
    for variant, depths in results.items():
        for depth, runs in sorted(depths.items(), key=lambda kv: int(kv[0])):
            for seed, run in runs.items():
                acc = _final(run, "test_acc")
                if acc is not None and acc >= below:
                    continue
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
    ax.legend()
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
        ax.legend(fontsize=7)
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
    ax.set_title("per-layer firing rate after training", fontsize=10)
    ax.legend(fontsize=7)
    out["layer_rates.png"] = _png(fig)
    return out


def write_report(run_dir: str) -> str:
    """Re-render the tables, plots, ``report.md`` and ``report.html`` of a sweep directory; returns
    the text summary. The numbers come from the run files (``runs/*.json``, the source of truth);
    ``results.json`` and ``results_seeds.json`` are made again from them, and one that says
    something else (edited by hand, corrupt) is refused with an error naming it."""
    from .depth_scaling import load_sweep
    from ..runfiles import write_atomic
    config, results = load_sweep(run_dir)
    rows = summarize(results)
    variants = list(results)
    table, notes = summary_table(rows, variants), observations(rows, variants)
    notes += failing_verdicts(results)
    images = plots(results, rows)
    for name, data in images.items():
        write_atomic(os.path.join(run_dir, name), lambda f, data=data: f.write(data))
    seeds = ", ".join(str(s) for s in config["seeds"])
    steps = ("sequence input, one value per step" if config["train"]["encoder"] == "sequence"
             else f"T={config['train']['T']}")
    head = (f"Depth scaling on {config['dataset']} with the spiking {config['model'].upper()} "
            f"(width {config['width']}, {steps}, {config['train']['epochs']} epochs, seeds {seeds}, "
            f"reg {config['train']['reg_type']}, init {', '.join(config['inits'])}, "
            f"surrogate slope {config['surrogate_slope']:g})")
    md = [f"# {head}", "", "```", table, "```", "", "## Observations", ""] + [f"- {n}" for n in notes] + [""]
    md += [f"![{n}]({n})" for n in images]
    write_atomic(os.path.join(run_dir, "report.md"), lambda f: f.write(("\n".join(md) + "\n").encode()))
    esc = html.escape  # every string from the sweep's files, quotes included
    imgs = "".join(f"<img alt='{esc(n)}' src='data:image/png;base64,{base64.b64encode(b).decode()}'><br>"
                   for n, b in images.items())
    notes_html = "".join(f"<li>{esc(n)}</li>" for n in notes)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>depth scaling</title></head>"
            f"<body style='font-family:sans-serif;margin:2em'><h1>{esc(head)}</h1><pre>{esc(table)}</pre>"
            f"<h2>Observations</h2><ul>{notes_html}</ul>{imgs}</body></html>")
    write_atomic(os.path.join(run_dir, "report.html"), lambda f: f.write(page.encode("utf-8")))
    return f"{head}\n{table}\n" + "\n".join(notes)
