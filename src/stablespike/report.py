"""Rendering of reports: text summaries and a self-contained HTML page with embedded PNG plots.

Aggregating is done elsewhere (profiler, stability); this module only draws and formats.
"""
from __future__ import annotations

import base64
import html
import io
import math
from typing import List, Optional

import numpy as np


def profile_summary(report) -> str:
    """Plain-text summary of a :class:`~stablespike.profiler.ProfileReport`."""
    lines = [f"=== Spike profile: health {report.health_score:.0f}/100, "
             f"{len(report.pathologies)} finding(s) ==="]
    lines.append(f"{'layer':<20} {'neurons':>8} {'rate':>8} {'dead':>7} {'sat':>7} "
                 f"{'V mean':>8} {'V std':>8} {'|grad|':>9}")
    for s in report.layer_stats.values():
        lines.append(f"{s.name:<20} {s.n_neurons:>8} {s.firing_rates.mean():>8.4f} "
                     f"{s.dead_neuron_fraction:>7.1%} {s.saturated_neuron_fraction:>7.1%} "
                     f"{_num(s.voltage_mean):>8} {_num(s.voltage_std):>8} {_num(s.grad_norm_mean):>9}")
    for p in report.pathologies:
        lines.append(f"[{p.severity.value}] {p.category} @ {p.layer}: {p.message}")
        lines.append(f"    fix: {p.suggestion}")
    if not report.pathologies:
        lines.append("no pathology found")
    return "\n".join(lines)


def _num(x: float) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3g}"


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    import matplotlib.pyplot as plt
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def rate_histograms(report) -> str:
    """One histogram of per-neuron firing rates per layer, base64 PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    layers = list(report.layer_stats.values())
    cols = min(4, len(layers))
    rows = math.ceil(len(layers) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
    bins = np.linspace(0, 1, 41)
    th = report.thresholds
    for ax, s in zip(axes.flat, layers):
        ax.hist(np.clip(s.firing_rates, 0, 1), bins=bins, color="#4c72b0")
        ax.axvline(th.dead_rate, color="#c44e52", lw=1, ls="--")
        ax.axvline(th.saturated_rate, color="#dd8452", lw=1, ls="--")
        ax.set_title(f"{s.name} (mean {s.firing_rates.mean():.3f})", fontsize=9)
        ax.set_xlabel("firing rate", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(layers):]:
        ax.axis("off")
    fig.suptitle("per-neuron firing rates (dashed: dead / saturated thresholds)", fontsize=10)
    fig.tight_layout()
    return _png(fig)


def gradient_by_depth(report) -> Optional[str]:
    """Mean and max gradient norm per layer, in depth order, log scale; None without gradients."""
    layers = [s for s in report.layer_stats.values() if not math.isnan(s.grad_norm_mean)]
    if not layers:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3))
    x = np.arange(len(layers))
    ax.semilogy(x, [max(s.grad_norm_mean, 1e-30) for s in layers], "o-", label="mean")
    ax.semilogy(x, [max(s.grad_norm_max, 1e-30) for s in layers], "s--", label="max", alpha=0.7)
    ax.set_xticks(x, [s.name for s in layers], rotation=30, fontsize=8)
    ax.set_ylabel("|dL/d input current|")
    ax.set_title("gradient norm by depth (after the surrogate)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


_STYLE = """body{font-family:sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:4px 8px;font-size:13px}th{background:#f0f0f0}
.CRITICAL{color:#b00;font-weight:bold}.WARNING{color:#b60}.INFO{color:#555}img{max-width:100%}"""


def profile_html(report, path: Optional[str] = None) -> str:
    """The report as one HTML page with embedded images; written to ``path`` when given."""
    esc = html.escape
    rows: List[str] = []
    for s in report.layer_stats.values():
        rows.append(f"<tr><td>{esc(s.name)}</td><td>{s.n_neurons}</td><td>{s.firing_rates.mean():.4f}</td>"
                    f"<td>{s.dead_neuron_fraction:.1%}</td><td>{s.saturated_neuron_fraction:.1%}</td>"
                    f"<td>{_num(s.voltage_mean)}</td><td>{_num(s.voltage_std)}</td>"
                    f"<td>{_num(s.grad_norm_mean)}</td></tr>")
    findings = "".join(
        f"<tr><td class='{p.severity.value}'>{p.severity.value}</td><td>{esc(p.category)}</td>"
        f"<td>{esc(p.layer)}</td><td>{esc(p.message)}</td><td>{esc(p.suggestion)}</td></tr>"
        for p in report.pathologies) or "<tr><td colspan=5>no pathology found</td></tr>"
    images = [("firing-rate histograms", rate_histograms(report))]
    grad = gradient_by_depth(report)
    if grad:
        images.append(("gradient norm by depth", grad))
    figures = "".join(f"<h2>{t}</h2><img alt='{t}' src='data:image/png;base64,{b}'>" for t, b in images)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>stablespike profile</title>"
            f"<style>{_STYLE}</style></head><body><h1>Spike profile</h1>"
            f"<p>Health score <b>{report.health_score:.0f}/100</b>, {len(report.pathologies)} finding(s).</p>"
            f"<h2>Findings</h2><table><tr><th>severity</th><th>category</th><th>layer</th>"
            f"<th>measured</th><th>fix</th></tr>{findings}</table>"
            f"<h2>Layers</h2><table><tr><th>layer</th><th>neurons</th><th>mean rate</th><th>dead</th>"
            f"<th>saturated</th><th>V mean</th><th>V std</th><th>mean |grad|</th></tr>{''.join(rows)}</table>"
            f"{figures}</body></html>")
    if path is not None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(page)
    return page
