"""``python -m msfused bench``: the workloads of WORKLOADS.md, fused against naive (and torch.compile).

Prints a table to stdout (progress goes to stderr) and writes ``results.json``, ``table.txt`` and
``speedups.png`` (the times against the floor, with the speedups; when matplotlib is importable) into the
output folder. The implementations of one case are timed interleaved (runner.py).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch

from . import report, runner
from .workloads import WORKLOADS, Workload, select

_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}


def _list(text: str) -> List[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def batch_sizes(text: str, workloads: Sequence[Workload]) -> Dict[str, int]:
    """``--n``: ``N`` (every workload), ``name=N`` items (those workloads; the others keep their default), or
    both, comma-separated, as {workload name: N}. Raises ``ValueError`` naming a bad item."""
    sizes: Dict[str, int] = {}
    for item in _list(text):
        name, _, value = item.rpartition("=")
        try:
            size = int(value)
        except ValueError:
            raise ValueError(f"--n: {item!r} is not N or workload=N") from None
        if size < 1:
            raise ValueError(f"--n must be >= 1, got {item!r}")
        if not name:
            sizes.update({w.name: size for w in workloads if w.name not in sizes})
            continue
        if name not in WORKLOADS:
            raise ValueError(f"--n: unknown workload {name!r}; known: {', '.join(WORKLOADS)}")
        if all(w.name != name for w in workloads):
            raise ValueError(f"--n: {name} is not among the workloads to run")
        sizes[name] = size
    if not sizes:
        raise ValueError(f"--n: no batch size in {text!r}")
    return sizes


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m msfused bench",
        description="Time msfused's fused blocks against the naive composition (eager, and torch.compile) on "
        "the workloads of WORKLOADS.md, measured side by side (one call of each in turn), with the floor "
        "(bytes read / read rate + bytes written / write rate, or FLOPs / matmul rate).",
        epilog="Exit status: 0 when every naive and fused case ran (a torch.compile baseline that fails is "
        "reported in the table, not in the status); 1 when a case failed or no fused backend ran (unless "
        "--naive-only or --impl asked for none); 2 for bad options.",
    )
    p.add_argument("--device", default=_default_device(), help="cpu or cuda (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default=None,
                   help="comma-separated dtypes: float32, bfloat16, float16, float64 "
                        "(default: float32 on a CPU, bfloat16,float32 on a GPU)")
    p.add_argument("--workloads", default=None, help=f"comma-separated, default all: {', '.join(WORKLOADS)}")
    p.add_argument("--mode", default=",".join(runner.MODES), help="comma-separated: inference, train (default both)")
    p.add_argument("--impl", default=None,
                   help="comma-separated implementations: naive, compiled, or msfused backends (cpu, cuda, triton, "
                        "auto, reference); default: naive, compiled off a CPU, and every fused backend available")
    p.add_argument("--naive-only", action="store_true",
                   help="time the naive block alone (and torch.compile of it with --compile), on purpose: without "
                        "this, a run that finds no fused backend says so and exits 1")
    compile_group = p.add_mutually_exclusive_group()
    compile_group.add_argument("--compile", dest="compile", action="store_true", default=None,
                               help="include torch.compile of the naive block (default: on a GPU yes, on a CPU no: "
                                    "compiling takes 5-30 s a case on a small CPU)")
    compile_group.add_argument("--no-compile", dest="compile", action="store_false",
                               help="leave torch.compile out")
    batch = p.add_mutually_exclusive_group()
    batch.add_argument("--n", default=None,
                       help="batch size: N for every workload, or per workload, e.g. psp_head_mmseg=1 (the others keep "
                            "their default), or both, e.g. 2,psp_head_mmseg=1 (overrides the table). A training case "
                            "needs N >= 2 where a branch norms a 1x1 level with batch statistics: at N = 1 its row "
                            "says so")
    batch.add_argument("--full-n", action="store_true",
                       help="the full batch sizes of WORKLOADS.md (the default on a GPU; a CPU uses each workload's "
                            "cpu_n unless this is given)")
    p.add_argument("--reps", type=int, default=None,
                   help="timed calls per case (default 20 on a CPU, 100 on a GPU; fewer, at least 5, when a case "
                        "would take longer than --max-seconds)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 2 on a CPU, 10 on a GPU)")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="time budget of one case's timed calls (default 3 on a CPU, 10 on a GPU)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads for CPU runs (default: torch's own choice)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory call")
    p.add_argument("--out", default="msfused-bench", help="output folder (default: msfused-bench/ under the cwd)")
    p.add_argument("--list", action="store_true", help="list the workloads and exit")
    return p


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    if args.list:
        for workload in WORKLOADS.values():
            print(workload.describe())
        return 0
    try:
        try:
            device = torch.device(args.device)
        except RuntimeError as e:
            raise ValueError(f"--device: {e}") from None
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"--device takes cpu or cuda, got {args.device!r}")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: torch sees no CUDA device")
        workloads = select(_list(args.workloads) if args.workloads else None)
        dtype_names = _list(args.dtype) if args.dtype else (["float32"] if device.type == "cpu" else ["bfloat16", "float32"])
        unknown = [d for d in dtype_names if d not in _DTYPES]
        if unknown:
            raise ValueError(f"unknown dtype(s) {', '.join(unknown)}; known: {', '.join(_DTYPES)}")
        dtypes = [_DTYPES[d] for d in dtype_names]
        modes = _list(args.mode)
        bad_modes = [m for m in modes if m not in runner.MODES]
        if bad_modes or not modes:
            raise ValueError(f"--mode takes {', '.join(runner.MODES)}, got {args.mode!r}")
        if args.naive_only and args.impl:
            raise ValueError("--naive-only and --impl: give one of them")
        if args.naive_only:
            impls = ["naive"] + (["compiled"] if args.compile else [])
        else:
            impls = _list(args.impl) if args.impl else runner.default_impls(device, args.compile)
        if args.compile is True and "compiled" not in impls:
            impls.insert(1 if impls[:1] == ["naive"] else 0, "compiled")
        if args.compile is False:
            impls = [i for i in impls if i != "compiled"]
        runner.check_impls(impls)
        if not impls:
            raise ValueError("no implementation to run")
        n = batch_sizes(args.n, workloads) if args.n is not None else None
        if args.threads is not None and args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
    except ValueError as e:
        print(f"python -m msfused bench: {e}", file=sys.stderr)
        return 2

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    _progress(f"msfused bench on {device}: {len(workloads)} workloads x {', '.join(modes)} x "
              f"{', '.join(dtype_names)} x {', '.join(impls)}")
    # Asked for nothing fused (--naive-only, or an --impl list without a fused backend): a table without
    # fused rows is what was wanted. Otherwise it means no fused backend could run here.
    fused_wanted = not args.naive_only and (args.impl is None or any(runner.is_fused(i) for i in impls))
    if fused_wanted and not any(runner.is_fused(i) for i in impls):
        _progress(f"warning: {report.no_fused_backend_line(runner.fused_backends(device), str(device))}")
    result = runner.run(
        workloads, modes=modes, dtypes=dtypes, impls=impls, device=device, n=n, full_n=args.full_n,
        warmup=args.warmup, reps=args.reps, max_seconds=args.max_seconds, memory=not args.no_memory,
        progress=_progress,
    )
    wall_s = time.perf_counter() - started
    result["environment"]["wall_s"] = wall_s
    result["environment"]["argv"] = argv
    result["environment"]["naive_only"] = not fused_wanted

    table = report.format_table(result)
    print(table)
    os.makedirs(args.out, exist_ok=True)
    json_path = os.path.join(args.out, "results.json")
    report.save_json(result, json_path)
    with open(os.path.join(args.out, "table.txt"), "w") as f:
        f.write(table + "\n")
    chart_path = os.path.join(args.out, "speedups.png")
    skipped = report.save_chart(result, chart_path)
    print(f"wrote {json_path}, {os.path.join(args.out, 'table.txt')}"
          + (f", {chart_path}" if skipped is None else f"; chart skipped: {skipped}"), file=sys.stderr)
    print(f"done in {wall_s:.0f} s", file=sys.stderr)
    failed = [r for r in result["rows"] if r["error"] and r["impl"] != "compiled"]
    fused_ran = any(runner.is_fused(r["impl"]) and not r["error"] for r in result["rows"])
    return 1 if failed or (fused_wanted and not fused_ran) else 0
