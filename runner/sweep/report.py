"""``python -m runner.sweep report <dir>``: members ranked by objective, and a picture of the sweep.

The table shows only the hyperparameters that differ between members. ``report.png`` has the learning
curves of every member (from each run's ``metrics.jsonl``; partial for members still running) and the
objective against each swept hyperparameter; ``report.md`` holds the table and links the image.
matplotlib is an optional extra (``pip install runner[report]``): without it the table is still printed.
"""

from __future__ import annotations

import math
import os
from typing import Any

from runner.sweep.commands import member_label, table
from runner.sweep.ledger import Record

#: The objective a run returns (final eval top-1): higher is better.
OBJECTIVE = "eval top-1"


def parse_overrides(overrides: list[str]) -> dict[str, str]:
    out = {}
    for o in overrides:
        key, sep, value = o.lstrip("+~").partition("=")
        if sep:
            out[key] = value
    return out


def swept(records: list[Record]) -> list[str]:
    """Override keys whose values differ between members (in the order they appear)."""
    params = [parse_overrides(r.overrides) for r in records]
    keys: list[str] = []
    for p in params:
        keys.extend(k for k in p if k not in keys)
    return [k for k in keys if len({p.get(k) for p in params}) > 1]


def ranked(records: list[Record]) -> list[Record]:
    """Best first; members without an objective (yet) last, in index order."""

    def score(r: Record) -> tuple[int, float, int]:
        ok = r.objective is not None and math.isfinite(r.objective)
        return (0 if ok else 1, -(r.objective or 0.0) if ok else 0.0, r.index if r.index is not None else 1 << 30)

    return sorted(records, key=score)


def rows(records: list[Record]) -> tuple[list[str], list[list[str]]]:
    keys = swept(records)
    header = ["rank", "#", *keys, OBJECTIVE, "state", "step"]
    out = []
    for rank, r in enumerate(ranked(records), 1):
        p = parse_overrides(r.overrides)
        objective = "-" if r.objective is None or not math.isfinite(r.objective) else f"{r.objective:.4f}"
        step = f"{r.step if r.step is not None else 0}/{r.total}" if r.total else "-"
        out.append([str(rank), str(r.index), *[p.get(k, "-") for k in keys], objective, r.state, step])
    return header, out


def _curves(record: Record) -> dict[str, list[tuple[int, float]]]:
    from runner.train.metrics import read_metrics

    path = os.path.join(record.run_dir or "", "metrics.jsonl")
    if not record.run_dir or not os.path.exists(path):
        return {}
    curves: dict[str, list[tuple[int, float]]] = {"train loss": [], "eval top-1": []}
    for m in read_metrics(path):
        if m["split"] == "train" and isinstance(m.get("loss"), int | float):
            curves["train loss"].append((m["step"], float(m["loss"])))
        elif m["split"] == "eval" and isinstance(m.get("top1"), int | float):
            curves["eval top-1"].append((m["step"], float(m["top1"])))
    return curves


def _numeric(values: list[str]) -> list[float] | None:
    try:
        return [float(v) for v in values]
    except ValueError:
        return None


def plot(records: list[Record], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = swept(records)
    panels = 2 + len(keys)
    cols = min(panels, 3)
    nrows = math.ceil(panels / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 4.2 * nrows), squeeze=False)
    flat = list(axes.flat)
    colors = plt.get_cmap("tab10")
    for i, r in enumerate(records):
        curves = _curves(r)
        label = f"#{r.index} " + " ".join(f"{k}={parse_overrides(r.overrides).get(k, '-')}" for k in keys)
        for ax, metric in zip(flat[:2], ("train loss", "eval top-1"), strict=True):
            points = curves.get(metric, [])
            if points:
                steps, values = zip(*points, strict=True)
                ax.plot(steps, values, marker="o", markersize=3, color=colors(i % 10), label=label)
    for ax, metric in zip(flat[:2], ("train loss", "eval top-1"), strict=True):
        ax.set_xlabel("step")
        ax.set_ylabel(metric)
        ax.set_title(f"{metric} per member")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7, loc="best")
    done = [r for r in records if r.objective is not None and math.isfinite(r.objective)]
    for ax, key in zip(flat[2:], keys, strict=False):
        choices = [parse_overrides(r.overrides).get(key, "-") for r in done]
        ys = [float(r.objective or 0.0) for r in done]
        xs = _numeric(choices)
        if xs is not None:
            ax.scatter(xs, ys, color=[colors(records.index(r) % 10) for r in done])  # same colour as its curves
            if xs and min(xs) > 0 and max(xs) / min(xs) >= 10:
                ax.set_xscale("log")
        else:
            order = sorted(set(choices))
            xs = [float(order.index(v)) for v in choices]
            ax.scatter(xs, ys, color=[colors(records.index(r) % 10) for r in done])
            ax.set_xticks(range(len(order)), order, rotation=20)
        for r, x, y in zip(done, xs, ys, strict=True):
            ax.annotate(f"#{r.index}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xlabel(key)
        ax.set_ylabel(f"objective ({OBJECTIVE})")
        ax.set_title(f"objective vs {key}")
        ax.grid(alpha=0.3)
    for ax in flat[panels:]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def report(sweep_dir: str, records: list[Record]) -> tuple[str, dict[str, Any]]:
    """Prints nothing: returns the text table and what was written."""
    header, body = rows(records)
    text = table(body, header)
    best = ranked(records)[0] if records else None
    written: dict[str, Any] = {"best": best}
    png = os.path.join(sweep_dir, "report.png")
    try:
        plot(records, png, f"sweep {os.path.basename(os.path.abspath(sweep_dir))}: {len(records)} members")
        written["png"] = png
    except ImportError:
        written["png"] = None
    md = [f"# Sweep report: {os.path.abspath(sweep_dir)}", ""]
    md.append("| " + " | ".join(header) + " |")
    md.append("|" + "---|" * len(header))
    md.extend("| " + " | ".join(row) + " |" for row in body)
    if best is not None and best.objective is not None:
        md += ["", f"Best: member #{best.index} ({member_label(best)}), {OBJECTIVE} {best.objective:.4f}."]
    if written["png"]:
        md += ["", "![learning curves and objective per hyperparameter](report.png)"]
    md_path = os.path.join(sweep_dir, "report.md")
    with open(f"{md_path}.tmp", "w") as f:
        f.write("\n".join(md) + "\n")
    os.replace(f"{md_path}.tmp", md_path)
    written["md"] = md_path
    return text, written
