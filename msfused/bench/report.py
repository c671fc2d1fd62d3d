"""Presenting benchmark results: the text table, the JSON file, and the chart of times against the floor
(matplotlib if it is importable: the ``bench`` extra installs it; it is not a dependency of msfused)."""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Sequence

from .runner import is_fused

COLUMNS = (
    # (header, row key, format)
    ("workload", "workload", "{}"),
    ("N", "n", "{}"),
    ("mode", "mode", "{}"),
    ("dtype", "dtype", "{}"),
    ("impl", "impl", "{}"),
    ("ms", "median_ms", "{:.3g}"),
    ("host ms", "host_ms", "{:.3g}"),  # (GPU check only) host time per call, queued without waiting
    ("peak MiB", "peak_mem_mib", "{:.1f}"),
    ("x naive", "speedup_vs_naive", "{:.2f}"),
    ("x compiled", "speedup_vs_compiled", "{:.2f}"),
    ("t/floor", "time_over_floor", "{:.3g}"),
    ("GB/s", "gbps", "{:.3g}"),
    ("TFLOP/s", "tflops", "{:.3g}"),
)


_IDENTITY = ("workload", "n", "mode", "dtype", "impl")  # the columns that name a case
_OPTIONAL = ("host_ms",)  # shown only when some row has it


def _columns(rows: Sequence[Dict[str, Any]]) -> list:
    return [c for c in COLUMNS if c[1] not in _OPTIONAL or any(r.get(c[1]) is not None for r in rows)]


def _cells(row: Dict[str, Any], columns: Sequence[tuple] = COLUMNS) -> List[str]:
    """A row's table cells; a failed case shows 'error' for its time (the message goes below the table)."""
    cells = []
    for _, key, fmt in columns:
        value = row.get(key)
        if key == "peak_mem_mib" and row.get("peak_mem_bytes") is not None:
            value = row["peak_mem_bytes"] / 2**20
        if row.get("error") and key not in _IDENTITY:
            cells.append("error" if key == "median_ms" else "")
        else:
            cells.append("-" if value is None else fmt.format(value))
    return cells


def impl_label(impl: str) -> str:
    """What an implementation name means, for legends: 'cpu' is msfused's backend, not the device."""
    if impl == "naive":
        return "eager naive (PyTorch)"
    if impl == "compiled":
        return "torch.compile naive"
    if impl == "reference":
        return "msfused reference (plain PyTorch)"
    return f"msfused ({impl} backend)"


def no_fused_backend_line(fused_backends: Dict[str, str], device: str) -> str:
    """Says that no fused backend can run on ``device`` and why (``fused_backends``: name -> reason)."""
    reasons = "; ".join(f"{name}: {why}" for name, why in fused_backends.items() if why)
    return (f"NO FUSED BACKEND: none can run on {device}" + (f" ({reasons})" if reasons else "")
            + "; this table times the naive block only")


# Other processes keeping this share of a CPU busy on average make a CPU run's timings noisy.
BUSY_CPUS = 0.25


def busy_warning(env: Dict[str, Any]) -> Optional[str]:
    """A warning when other processes used the machine's CPUs during a CPU run (measured from
    /proc/stat where the run recorded it, else the load average at its start), None when it was quiet."""
    if env.get("device") != "cpu":
        return None
    others = env.get("other_cpu_load")
    if others is not None:
        if others < BUSY_CPUS:
            return None
        busy = f"other processes kept {others:.2g} of the {env.get('cpu_count', '?')} CPUs busy on average during the run"
    elif env.get("loadavg") and env["loadavg"][0] >= 1.0:
        busy = "other processes were using the CPU when the run started"
    else:
        return None
    return (f"warning: {busy}: timings are noisy, multi-threaded ones the most (a thread that loses its core "
            "stalls the others at every parallel region); compare runs on an idle machine, or with --threads 1")


def _rates_line(rates: Dict[str, Any]) -> str:
    if "read_gbps" in rates:
        memory = f"read {rates['read_gbps']:.3g} GB/s, write {rates['write_gbps']:.3g} GB/s"
    else:  # results from before the floor took reads and writes apart
        memory = f"copy {rates['copy_gbps']:.3g} GB/s"
    return f"floor rates ({rates['dtype']}): {memory}, matmul {rates['matmul_tflops']:.3g} TFLOP/s"


def header_lines(result: Dict[str, Any]) -> List[str]:
    """The device, versions and measured rates a table's figures depend on, what its implementations
    are, and warnings: no fused backend ran, the machine was busy."""
    env = result["environment"]
    lines = [
        f"device: {env['device']} ({env['device_name']}); torch {env['torch']}, triton {env['triton'] or '-'}, "
        f"msfused {env['msfused']}",
    ]
    lines += [_rates_line(rates) for rates in result["rates"]]
    if env.get("loadavg"):
        others = env.get("other_cpu_load")
        lines.append(
            f"load average (1 min) at start {env['loadavg'][0]}, at end {(env.get('loadavg_after') or ['?'])[0]} "
            f"on {env['cpu_count']} CPUs; torch uses {env['threads']} threads"
            + ("" if others is None else f"; other processes used {others:.2g} CPUs during the run")
        )
    impls = list(dict.fromkeys(r["impl"] for r in result["rows"]))
    lines.append("impl: " + ", ".join(f"{impl} = {impl_label(impl)}" for impl in impls))
    if "fused_backends" in env and not any(is_fused(i) for i in impls):
        lines.append("fused backends: not run (--naive-only)" if env.get("naive_only")
                     else no_fused_backend_line(env["fused_backends"], env["device"]))
    warning = busy_warning(env)
    if warning:
        lines.append(warning)
    if result.get("note"):  # what the run's JSON says about itself (e.g. phases not reached)
        import textwrap

        lines += textwrap.wrap("note: " + result["note"], 110, subsequent_indent="  ")
    return lines


def format_table(result: Dict[str, Any]) -> str:
    """A fixed-width table of every row, with the header lines above it and errors below it."""
    rows = result["rows"]
    columns = _columns(rows)
    cells = [[header for header, _, _ in columns]] + [_cells(row, columns) for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    left = {"workload", "mode", "dtype", "impl"}

    def line(r: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if key in left else c.rjust(w) for c, w, (_, key, _) in zip(r, widths, columns)
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
    """Bar chart of each implementation's time (ms, log scale), one panel per (mode, dtype), one group of
    bars per workload with the floor drawn across it, each bar labelled with its time and its speedup
    over eager naive; the title says when the machine was busy. Returns None when written, else why not
    (matplotlib missing, nothing to plot)."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib, or the bench extra: pip install \".[bench]\")"
    rows = [r for r in result["rows"] if r.get("median_ms")]
    if not rows:
        return "no timings to plot"
    panels = sorted({(r["mode"], r["dtype"]) for r in rows})
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    workloads = list(dict.fromkeys(r["workload"] for r in result["rows"]))
    figsize = (max(7.0, 1.1 * len(workloads) * max(2, len(impls))), 3.6 * len(panels) + 0.6)
    fig, axes = plt.subplots(len(panels), 1, figsize=figsize, squeeze=False)
    width = 0.8 / len(impls)
    legend: Dict[str, Any] = {}  # label -> handle, one legend for every panel
    for ax, (mode, dtype) in zip(axes[:, 0], panels):
        cases = {(r["workload"], r["impl"]): r for r in rows if r["mode"] == mode and r["dtype"] == dtype}
        failed = {(r["workload"], r["impl"]) for r in result["rows"]
                  if r.get("error") and r["mode"] == mode and r["dtype"] == dtype}
        for j, impl in enumerate(impls):
            xs = [i + (j - (len(impls) - 1) / 2) * width for i in range(len(workloads))]
            found = [cases.get((w, impl)) for w in workloads]
            # NaN leaves a gap for a case that failed or was not run.
            bars = ax.bar(xs, [r["median_ms"] if r else float("nan") for r in found], width, label=impl_label(impl))
            ax.bar_label(bars, labels=[_bar_text(r) for r in found], fontsize=6)
            for x, workload in zip(xs, workloads):
                if (workload, impl) in failed:
                    ax.annotate("failed: see the table", (x, 0.02), xycoords=("data", "axes fraction"),
                                rotation=90, ha="center", va="bottom", fontsize=6, color="firebrick")
        floors = [next((r["floor_ms"] for (w, _), r in cases.items() if w == workload and r.get("floor_ms")), None)
                  for workload in workloads]
        for i, floor in enumerate(floors):
            if floor:
                ax.hlines(floor, i - 0.45, i + 0.45, colors="black", linewidth=1.5,
                          label="floor (measured read/write and matmul rates)" if i == floors.index(floor) else None)
        ax.set_yscale("log")  # workloads differ by orders of magnitude
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g ms"))
        ax.set_xlim(-0.5, len(workloads) - 0.5)  # fixed, so that a gap does not shift the groups
        ax.set_xticks(range(len(workloads)))
        ax.set_xticklabels([f"{w}\nN={_n_of(result, w)}" for w in workloads], fontsize=8)
        ax.set_ylabel("time per call (median)")
        ax.set_title(f"{mode}, {dtype} (labels: ms, and speedup over eager naive)", fontsize=10)
        handles, labels = ax.get_legend_handles_labels()
        legend.update(zip(labels, handles))
    env = result["environment"]
    title = f"msfused {env['msfused']} on {env['device_name']} (torch {env['torch']})"
    warning = busy_warning(env)
    if warning:
        title += "\n" + warning.split(":")[0] + ": " + warning.split(":")[1].strip() + ": timings are noisy"
    fig.suptitle(title, fontsize=9, color="firebrick" if warning else "black")
    fig.legend(legend.values(), legend.keys(), loc="lower center", ncol=2, fontsize=8)
    legend_inches = 0.25 * ((len(legend) + 1) // 2) + 0.15
    fig.tight_layout(rect=(0, legend_inches / figsize[1], 1, 1))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def _bar_text(row: Optional[Dict[str, Any]]) -> str:
    if row is None:
        return ""
    text = f"{row['median_ms']:.3g}"
    if row["impl"] != "naive" and row.get("speedup_vs_naive"):
        text += f"\n{row['speedup_vs_naive']:.2f}x"
    return text


def _n_of(result: Dict[str, Any], workload: str) -> Any:
    return next((r["n"] for r in result["rows"] if r["workload"] == workload), "?")
