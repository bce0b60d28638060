"""The demo's table and plot, and the spread of V0 across seeds."""
from __future__ import annotations

from pathlib import Path

import numpy as np

# the four panels of the demo's plot
CURVES = ("clamp_log_ratio_new_old_indicator", "kl_new_old", "entropy", "reward")


def envelope(reference: list[list[dict]], metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-step min and max of ``metric`` over the reference runs (the spread of V0)."""
    n = min(len(h) for h in reference)
    vals = np.array([[h[i][metric] for i in range(n)] for h in reference], dtype=float)
    return np.nanmin(vals, axis=0), np.nanmax(vals, axis=0)


def format_table(rows: list[dict]) -> str:
    cols = [("run", "run", "{}"), ("final_reward", "final reward", "{:.3f}"), ("clip_rate", "clip rate", "{:.4f}"),
            ("kl_new_old", "kl_new_old", "{:.5f}"), ("entropy", "entropy", "{:.3f}"),
            ("mean_abs_r", "mean |lp_trainer-lp_rollout|", "{:.5f}"), ("gap_closed", "gap closed", "{:.0%}"),
            ("departs_at", "departs from v0 at step", "{}")]
    cells = [[h for _, h, _ in cols]]
    for r in rows:
        cells.append([("—" if r[k] is None else f.format(r[k])) for k, _, f in cols])
    widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    lines = []
    for j, c in enumerate(cells):
        lines.append("  ".join(s.ljust(w) if i == 0 else s.rjust(w) for i, (s, w) in enumerate(zip(c, widths))))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot_curves(results: list[dict], png: Path, *, spread_names: list[str]) -> Path:
    """Four panels (clip rate, kl_new_old, entropy, reward): one line per run, V0's spread shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_name = {r["name"]: r for r in results}
    fig, axes = plt.subplots(2, 2, figsize=(13, 8), sharex=True)
    for ax, metric in zip(axes.flat, CURVES):
        ref = [by_name[n]["history"] for n in spread_names if n in by_name]
        if ref:
            lo, hi = envelope(ref, metric)
            ax.fill_between(range(len(lo)), lo, hi, color="0.8", label="v0 spread (3 seeds)")
        for r in results:
            if r["name"] in spread_names[1:]:
                continue
            steps = [s["step"] for s in r["history"]]
            vals = [s[metric] for s in r["history"]]
            style = {"v0": dict(color="black", lw=2.2), "v1": dict(color="tab:red", lw=2.2),
                     "v1+fixes": dict(color="tab:green", lw=2.2, ls="--")}.get(r["name"], dict(lw=1, alpha=0.8))
            ax.plot(steps, vals, label=r["name"], **style)
        ax.set_title(metric)
        ax.grid(alpha=0.3)
    axes[1, 0].set_xlabel("step")
    axes[1, 1].set_xlabel("step")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle("replay demo: V0 reference, V1 defaults, V1 with fixes")
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    png = Path(png)
    fig.savefig(png, dpi=90)
    plt.close(fig)
    return png
