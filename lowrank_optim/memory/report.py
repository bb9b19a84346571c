"""Reports of an estimate: tables (text, markdown, CSV, JSON), the paper table, PNGs, wandb.

Every format carries the settings the numbers assume (:func:`settings_line`: model,
parameters, what is projected, rank, dtype, gradients): a line above the text and markdown
tables, columns of every CSV row, a ``settings`` field of the JSON.  Each estimate is also
put against AdamW on the same model (:meth:`MemoryEstimate.vs_adamw`): the optimizer's
bytes (state + projector) and the total, each as a ratio to AdamW's.
"""
from __future__ import annotations

import csv
import io
import json
import math
import textwrap
from collections.abc import Sequence
from typing import Any

from .estimator import FIELDS, GB, GIB, PEERS, MemoryEstimate

UNITS = {"GiB": GIB, "GB": GB, "MiB": 2**20, "B": 1}


def _scale(unit: str) -> float:
    if unit not in UNITS:
        raise ValueError(f"unknown unit {unit!r}; valid ones: {', '.join(UNITS)}")
    return UNITS[unit]


def _fmt(b: float, unit: str) -> str:
    return f"{b / _scale(unit):.4f}"


def _ratio(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.2f}x"


def _unique(values) -> list:
    out: list = []
    for v in values:
        if v not in out:
            out.append(v)
    return out


def settings_line(estimates: Sequence[MemoryEstimate]) -> str:
    """One line of what ``estimates`` assume: model (and what it was given as), parameters,
    projected matrices, rank(s), dtype (and why), gradients counted or not."""
    if not estimates:
        return "settings: (no estimates)"
    models = _unique((e.model, e.source, e.parameters) for e in estimates)
    parts = [f"model {m} ({src}), {n:,} parameters" for m, src, n in models]
    ours = [e for e in estimates if e.optimizer not in PEERS]
    for targets, matrices, share in _unique((e.targets, e.matrices, e.projected_share) for e in ours):
        parts.append(f"{matrices} matrices projected ({100 * share:.1f}% of the parameters; target_modules {targets})")
    sizes = _unique((e.density, e.rank, e.rank_note) for e in ours)
    if sizes:
        by_note: dict[str, list[str]] = {}
        for density, rank, note in sizes:
            by_note.setdefault(note, []).append(f"density {density:g}" if density is not None else str(rank))
        prefix = "" if all(d is not None for d, _, _ in sizes) else "rank " if len(sizes) == 1 else "ranks "
        parts.append(prefix + ", ".join(f"{', '.join(values)} ({note})" for note, values in by_note.items()))
    clamped = max((e.clamped for e in ours), default=0)
    if clamped:
        parts.append(f"rank above min(m, n) on {clamped} matrices, counted at min(m, n) (the optimizer refuses it)")
    parts += [f"dtype {d} ({note})" for d, note in _unique((e.dtype, e.dtype_note) for e in estimates)]
    grads = _unique(e.grads_counted for e in estimates)
    parts.append(" / ".join("gradients counted" if g else "no gradients" for g in grads))
    return "settings: " + "; ".join(parts)


def summary_rows(estimates: Sequence[MemoryEstimate]) -> list[dict[str, Any]]:
    """One flat record per estimate: its settings, its totals in bytes (``optimizer_total``
    = state + projector) and the two ratios to AdamW."""
    rows = []
    for e in estimates:
        totals, ratio = e.totals, e.vs_adamw()
        rows.append({"optimizer": e.optimizer, **e.settings(),
                     **{k: totals[k] for k in FIELDS}, "optimizer_total": totals["optimizer"], "total": totals["total"],
                     "optimizer_vs_adamw": ratio["optimizer"], "total_vs_adamw": ratio["total"]})
    return rows


def render(estimates: Sequence[MemoryEstimate], fmt: str = "table", unit: str = "GiB", per_layer: bool = False) -> str:
    """Totals per optimizer (and with ``per_layer`` one row per block) as ``table``,
    ``markdown``, ``csv`` (bytes) or ``json`` (bytes, with every parameter row), each with
    the settings (module docstring)."""
    if fmt not in ("table", "markdown", "csv", "json"):
        raise ValueError(f"unknown format {fmt!r}; valid ones: table, markdown, csv, json")
    _scale(unit)
    if fmt == "json":
        return json.dumps({"settings": settings_line(estimates), "estimates": [e.to_dict() for e in estimates]},
                          indent=1)
    if fmt == "csv":
        buf = io.StringIO()
        if per_layer:
            w = csv.writer(buf)
            head = list(estimates[0].settings())
            w.writerow(["optimizer", *head, "layer", *FIELDS, "total"])
            for e in estimates:
                settings = e.settings()
                for layer, g in e.per_layer().items():
                    w.writerow([e.optimizer, *(settings[k] for k in head), layer, *(g[k] for k in FIELDS),
                                sum(g.values())])
        else:
            rows = summary_rows(estimates)
            w = csv.DictWriter(buf, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        return buf.getvalue()
    head = ["optimizer", "rank", f"weights ({unit})", f"grads ({unit})", f"state ({unit})", f"projector ({unit})",
            f"total ({unit})", "state+proj. / AdamW", "total / AdamW"]
    body = []
    for e in estimates:
        ratio = e.vs_adamw()
        body.append([e.optimizer, _size(e), *(_fmt(e.totals[k], unit) for k in (*FIELDS, "total")),
                     _ratio(ratio["optimizer"]), _ratio(ratio["total"])])
    if per_layer:
        for e in estimates:
            for layer, g in e.per_layer().items():
                body.append([f"{e.optimizer}: {layer}", _size(e), *(_fmt(g[k], unit) for k in FIELDS),
                             _fmt(sum(g.values()), unit), "", ""])
    line = settings_line(estimates)
    return (line + "\n\n" if fmt == "markdown" else line + "\n") + _grid(head, body, fmt)


def render_measured(records: Sequence[dict[str, Any]], estimates: Sequence[MemoryEstimate], fmt: str = "table") -> str:
    """A measured run (``records``: one per optimizer and rank, state bytes measured and
    estimated) with the settings line of the ``estimates`` made for the same model."""
    line = settings_line(estimates)
    if fmt == "json":
        return json.dumps({"settings": line, "measured": list(records)}, indent=1)
    if fmt == "csv":
        buf = io.StringIO()
        settings = estimates[0].settings() if estimates else {}
        shared = {k: settings[k] for k in ("model", "source", "parameters", "dtype", "dtype_note") if k in settings}
        w = csv.DictWriter(buf, fieldnames=[*records[0], *shared])
        w.writeheader()
        w.writerows({**r, "cuda_peaks": json.dumps(r["cuda_peaks"]), **shared} for r in records)
        return buf.getvalue()
    head = ["optimizer", "rank", "measured state B", "estimated B", "B / param", "CUDA peaks"]
    body = [[r["optimizer"], "-" if r["optimizer"] in PEERS else
             f"density {r['density']:g}" if r["density"] is not None else str(r["rank"]),
             str(r["measured_state_bytes"]), str(r["estimated_state_bytes"]), f"{r['bytes_per_param']:.3f}",
             "; ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in r["cuda_peaks"].items()) or "(CPU: no peaks)"]
            for r in records]
    return (line + "\n\n" if fmt == "markdown" else line + "\n") + _grid(head, body, fmt)


def _size_label(e: MemoryEstimate) -> str:
    return e.optimizer if e.optimizer in PEERS else f"{e.optimizer} ({_size(e)})"


def _size(e: MemoryEstimate) -> str:
    """The rank column: rows of one table can differ (APOLLO-Mini's preset rank 1)."""
    if e.optimizer in PEERS:
        return "-"
    return f"density {e.density:g}" if e.density is not None else str(e.rank)


def _grid(head: list[str], body: list[list[str]], fmt: str) -> str:
    if fmt == "markdown":
        lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    line = lambda r: "  ".join(str(x).rjust(w) if i else str(x).ljust(w) for i, (x, w) in enumerate(zip(r, widths)))
    return "\n".join([line(head), "  ".join("-" * w for w in widths)] + [line(r) for r in body])


def render_paper(rows: list[dict[str, Any]], fmt: str = "table") -> str:
    if fmt == "json":
        return json.dumps(rows, indent=1)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
        return buf.getvalue()
    head = ["model", "rank", "Full GiB", "Full GB", "paper", "err %", "GaLore GiB", "GaLore GB", "paper", "err %"]
    body = [[r["model"], str(r["rank"]), f"{r['full_GiB']:.3f}", f"{r['full_GB']:.3f}", f"{r['paper_full']:.2f}",
             f"{r['full_err_%']:+.1f}", f"{r['galore_GiB']:.3f}", f"{r['galore_GB']:.3f}", f"{r['paper_galore']:.2f}",
             f"{r['galore_err_%']:+.1f}"] for r in rows]
    return _grid(head, body, "markdown" if fmt == "markdown" else "table")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


def _colors(plt, names: Sequence[str]) -> dict[str, Any]:
    """A distinct colour per name: the default cycle up to 10, tab20 beyond (every
    optimizer of the package fits without a repeat)."""
    cmap = plt.get_cmap("tab20")
    return {n: (f"C{i}" if len(names) <= 10 else cmap(i % 20)) for i, n in enumerate(names)}


def _title(fig, estimates: Sequence[MemoryEstimate]) -> None:
    # The settings go on the figure too, so that a PNG separated from its table still says
    # what it shows.
    text = settings_line(estimates).removeprefix("settings: ")
    fig.suptitle("\n".join(textwrap.wrap(text, 110)), fontsize=8, x=0.01, ha="left")


def _save(plt, fig, estimates: Sequence[MemoryEstimate], path: str) -> str:
    """Every plot's ending: the settings as its title, laid out, written, closed."""
    _title(fig, estimates)
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def plot(estimates: Sequence[MemoryEstimate], path: str, unit: str = "GiB", per_layer: bool = True) -> str:
    """PNG: stacked bars per optimizer (weights / grads / state / projector), each labelled
    with its total and its ratio to AdamW's; with ``per_layer``, below, the optimizer bytes
    per layer, side by side per optimizer.  Legends sit outside the axes, so no bar is
    hidden whatever the number of optimizers."""
    plt = _pyplot()
    scale = _scale(unit)
    n = len(estimates)
    width = max(7.0, 0.7 * n + 4)
    rows = 2 if per_layer else 1
    fig, axes = plt.subplots(rows, 1, figsize=(width, 4.5 * rows), squeeze=False)
    ax = axes[0][0]
    labels = [e.optimizer if e.optimizer in PEERS else f"{e.optimizer}\n{_size(e)}" for e in estimates]
    positions = list(range(n))
    bottom = [0.0] * n
    for k in FIELDS:
        vals = [e.totals[k] / scale for e in estimates]
        ax.bar(positions, vals, bottom=bottom, label=k, width=0.7)
        bottom = [b + v for b, v in zip(bottom, vals)]
    for x, e, top in zip(positions, estimates, bottom):
        ax.annotate(f"{top:.3g}\n{_ratio(e.vs_adamw()['total'])} AdamW", (x, top), xytext=(0, 2),
                    textcoords="offset points", ha="center", va="bottom", fontsize=7)
    ax.set_ylim(0, max(bottom) * 1.18 if max(bottom) > 0 else 1)  # room for the labels
    ax.set_xticks(positions, labels, rotation=45 if n > 4 else 0, ha="right" if n > 4 else "center", fontsize=8)
    ax.set_ylabel(f"total ({unit})")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, title="counted", title_fontsize=8)
    if per_layer:
        ax = axes[1][0]
        names: list[str] = []
        for e in estimates:
            names += [k for k in e.per_layer() if k not in names]
        bar = 0.8 / n
        colors = list(_colors(plt, [str(j) for j in range(n)]).values())
        for j, e in enumerate(estimates):
            groups = e.per_layer()
            vals = [(groups[k]["state"] + groups[k]["projector"]) / scale if k in groups else 0.0 for k in names]
            ax.bar([x + j * bar for x in range(len(names))], vals, width=bar, label=_size_label(e), color=colors[j])
        ax.set_xticks([x + 0.4 - bar / 2 for x in range(len(names))],
                      [k.replace("model.", "").removesuffix(".weight") for k in names], rotation=90, fontsize=6)
        ax.set_ylabel(f"state + projector ({unit})")
        ax.set_title("per layer", fontsize=9)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7)
    return _save(plt, fig, estimates, path)


def plot_ranks(estimates: Sequence[MemoryEstimate], path: str, unit: str = "GiB") -> str:
    """PNG of a rank sweep: the optimizer's bytes (state + projector) against the rank, one
    line per optimizer of ours; a peer (no rank) is a dashed level.  AdamW's level is drawn
    whether or not it was asked for, so every line reads against it."""
    plt = _pyplot()
    scale = _scale(unit)
    fig, ax = plt.subplots(figsize=(8, 4.8))
    ranks = sorted({e.rank for e in estimates if e.optimizer not in PEERS and e.rank is not None})
    by_optimizer: dict[str, list[MemoryEstimate]] = {}
    for e in estimates:
        by_optimizer.setdefault(e.optimizer, []).append(e)
    colors = _colors(plt, [n for n in by_optimizer if n != "adamw"])
    for name, group in by_optimizer.items():
        color = "0.4" if name == "adamw" else colors[name]
        if name in PEERS:
            level = group[0].totals["optimizer"] / scale
            ax.axhline(level, linestyle="--", linewidth=1, color=color, label=name)
            continue
        group = sorted((e for e in group if e.rank is not None), key=lambda e: e.rank)
        xs, ys = [e.rank for e in group], [e.totals["optimizer"] / scale for e in group]
        ax.plot(xs, ys, marker="o", label=name, color=color)
        ax.annotate(f"{ys[-1]:.3g}", (xs[-1], ys[-1]), xytext=(4, 0), textcoords="offset points", fontsize=7,
                    va="center", color=color)
    if "adamw" not in by_optimizer and estimates:
        ax.axhline(estimates[0].adamw["optimizer"] / scale, linestyle="--", linewidth=1, color="0.4", label="adamw")
    if len(ranks) > 1 and ranks[-1] / ranks[0] >= 4:
        ax.set_xscale("log", base=2)
    ax.set_xticks(ranks, [str(r) for r in ranks])
    ax.set_xlabel("rank")
    ax.set_ylabel(f"optimizer state + projector ({unit})")
    ax.set_ylim(bottom=0)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    return _save(plt, fig, estimates, path)


def log_wandb(estimates: Sequence[MemoryEstimate], project: str = "lowrank_optim-memory") -> None:
    """Log the totals as a wandb table (imported only here)."""
    import wandb

    rows = summary_rows(estimates)
    run = wandb.run or wandb.init(project=project, job_type="memory")
    run.log({"memory": wandb.Table(columns=list(rows[0]), data=[list(r.values()) for r in rows])})
