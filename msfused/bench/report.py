"""Presenting benchmark results: the text table, the JSON file, and the speedup chart (matplotlib if it
is importable; it is not a dependency of msfused)."""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Sequence

COLUMNS = (
    # (header, row key, format)
    ("workload", "workload", "{}"),
    ("N", "n", "{}"),
    ("mode", "mode", "{}"),
    ("dtype", "dtype", "{}"),
    ("impl", "impl", "{}"),
    ("ms", "median_ms", "{:.3g}"),
    ("peak MiB", "peak_mem_mib", "{:.1f}"),
    ("x naive", "speedup_vs_naive", "{:.2f}"),
    ("x compiled", "speedup_vs_compiled", "{:.2f}"),
    ("t/floor", "time_over_floor", "{:.3g}"),
    ("GB/s", "gbps", "{:.3g}"),
    ("TFLOP/s", "tflops", "{:.3g}"),
)


_IDENTITY = ("workload", "n", "mode", "dtype", "impl")  # the columns that name a case


def _cells(row: Dict[str, Any]) -> List[str]:
    """A row's table cells; a failed case shows 'error' for its time (the message goes below the table)."""
    cells = []
    for _, key, fmt in COLUMNS:
        value = row.get(key)
        if key == "peak_mem_mib" and row.get("peak_mem_bytes") is not None:
            value = row["peak_mem_bytes"] / 2**20
        if row.get("error") and key not in _IDENTITY:
            cells.append("error" if key == "median_ms" else "")
        else:
            cells.append("-" if value is None else fmt.format(value))
    return cells


def header_lines(result: Dict[str, Any]) -> List[str]:
    """The device, versions and measured rates a table's figures depend on."""
    env = result["environment"]
    lines = [
        f"device: {env['device']} ({env['device_name']}); torch {env['torch']}, triton {env['triton'] or '-'}, "
        f"msfused {env['msfused']}",
    ]
    for rates in result["rates"]:
        lines.append(
            f"floor rates ({rates['dtype']}): copy {rates['copy_gbps']:.3g} GB/s, matmul {rates['matmul_tflops']:.3g} TFLOP/s"
        )
    if env.get("loadavg"):
        lines.append(
            f"load average (1 min) at start {env['loadavg'][0]}, at end {(env.get('loadavg_after') or ['?'])[0]} "
            f"on {env['cpu_count']} CPUs; torch uses {env['threads']} threads"
        )
        if env["device"] == "cpu" and env["loadavg"][0] >= 1.0:
            lines.append(
                "warning: other processes were using the CPU when the run started: timings are noisy, "
                "multi-threaded ones the most (a thread that loses its core stalls the others at every "
                "parallel region); compare runs on an idle machine, or with --threads 1"
            )
    return lines


def format_table(result: Dict[str, Any]) -> str:
    """A fixed-width table of every row, with the header lines above it and errors below it."""
    rows = result["rows"]
    cells = [[header for header, _, _ in COLUMNS]] + [_cells(row) for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(COLUMNS))]
    left = {"workload", "mode", "dtype", "impl"}

    def line(r: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if key in left else c.rjust(w) for c, w, (_, key, _) in zip(r, widths, COLUMNS)
        ).rstrip()

    out = header_lines(result) + ["", line(cells[0]), "  ".join("-" * w for w in widths)]
    previous = None
    for row, r in zip(rows, cells[1:]):
        group = (row["workload"], row["mode"], row["dtype"])
        if previous is not None and group[0] != previous[0]:
            out.append("")
        previous = group
        out.append(line(r))
    errors = [r for r in rows if r.get("error")]
    if errors:
        out.append("")
        out.append("errors:")
        for r in errors:
            out.append(f"  {r['workload']} {r['mode']} {r['dtype']} {r['impl']}: {r['error']}")
    return "\n".join(out)


def save_json(result: Dict[str, Any], path: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)


def save_chart(result: Dict[str, Any], path: str) -> Optional[str]:
    """Bar chart (log scale) of each implementation's speedup over naive, one panel per (mode, dtype).
    Returns None when written, else why not (matplotlib missing, nothing to plot)."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib)"
    rows = [r for r in result["rows"] if r["impl"] != "naive" and r.get("speedup_vs_naive")]
    if not rows:
        return "no speedups to plot"
    panels = sorted({(r["mode"], r["dtype"]) for r in rows})
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    workloads = list(dict.fromkeys(r["workload"] for r in result["rows"]))
    figsize = (max(6.0, 0.9 * len(workloads) * max(2, len(impls))), 3.2 * len(panels))
    fig, axes = plt.subplots(len(panels), 1, figsize=figsize, squeeze=False)
    width = 0.8 / len(impls)
    for ax, (mode, dtype) in zip(axes[:, 0], panels):
        for j, impl in enumerate(impls):
            values = {r["workload"]: r["speedup_vs_naive"] for r in rows
                      if r["mode"] == mode and r["dtype"] == dtype and r["impl"] == impl}
            xs = [i + (j - (len(impls) - 1) / 2) * width for i in range(len(workloads))]
            # NaN leaves a gap for a case that failed or was not run.
            bars = ax.bar(xs, [values.get(w, float("nan")) for w in workloads], width, label=impl)
            ax.bar_label(bars, labels=[f"{values[w]:.2f}" if w in values else "" for w in workloads], fontsize=7)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log", base=2)  # ratios: 0.5x and 2x equally far from 1x
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%gx"))
        ax.set_xlim(-0.5, len(workloads) - 0.5)  # fixed, so that a gap does not shift the groups
        ax.set_xticks(range(len(workloads)))
        ax.set_xticklabels([f"{w}\nN={_n_of(result, w)}" for w in workloads], fontsize=8)
        ax.set_ylabel("speedup over naive")
        ax.set_title(f"{mode}, {dtype}", fontsize=10)
        ax.legend(fontsize=8)
    env = result["environment"]
    fig.suptitle(f"msfused {env['msfused']} on {env['device_name']} (torch {env['torch']})", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def _n_of(result: Dict[str, Any], workload: str) -> Any:
    return next((r["n"] for r in result["rows"] if r["workload"] == workload), "?")
