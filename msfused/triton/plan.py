"""The launch plan: every Triton launch one call of the block would make, recorded without a GPU.

The real launchers (``launch.py``) run on meta tensors with the launch itself replaced by a recorder, so
nothing is computed and nothing is allocated; each recorded launch is described by the cost model its
kernel declares next to its launcher (``@cost_model(kernel)`` in ``launch.py``): per program the active
lanes and the longest serial loop, per launch the bytes read and written and the matrix FLOPs. An
estimated time on a named device (``DEVICES``) follows::

    time = max(bytes / HBM bandwidth, FLOPs / matrix rate) / fill,   fill = min(1, programs / SMs)

Every figure of the plan is an estimate from the code, not a measurement. Autotuned kernels are planned
once per configuration of their list. ``python -m msfused explain WORKLOAD`` prints it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import subprocess
import sys
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import torch


@dataclasses.dataclass(frozen=True)
class Device:
    """What the estimate needs of a GPU: SMs, HBM bandwidth and dense matrix rates (vendor figures)."""

    name: str
    sms: int
    hbm_gbps: float
    tflops: Dict[str, float]  # by how the kernel multiplies: 'half' (bf16/fp16 tensor cores), 'tf32', 'fp32', 'fp64'


# NVIDIA's data sheet figures (SXM, dense): no measurement of ours.
DEVICES: Dict[str, Device] = {
    "H100": Device("H100 SXM", 132, 3350.0, {"half": 989.0, "tf32": 494.0, "fp32": 67.0, "fp64": 34.0}),
    "H200": Device("H200 SXM", 132, 4800.0, {"half": 989.0, "tf32": 494.0, "fp32": 67.0, "fp64": 34.0}),
}

#: Fewer programs than this multiple of the SM count running a serial loop of more than SERIAL_LIMIT steps
#: leave most of the GPU idle behind a few long programs (the plan test refuses such launches; counted per
#: part of a launch, as the long programs are its critical path whatever the other parts run).
MIN_WAVES = 2
SERIAL_LIMIT = 1024


@dataclasses.dataclass(frozen=True)
class Part:
    """One group of alike programs of a launch (the copy of x, or one branch slot): estimates."""

    what: str
    programs: int
    lanes: int  # active lanes (elements of the tile that hold real data) of one program
    serial: int  # the longest serial loop of one program (product of its nested run-time loops)
    read: int  # bytes read from memory (each distinct element once)
    written: int  # bytes written
    flops: int = 0  # matrix FLOPs executed (whole tiles, padding included)


#: kernel name -> f(args) -> [Part]; args maps every kernel argument name (constexprs included) to its value.
MODELS: Dict[str, Callable[[dict], List[Part]]] = {}


def kernel_name(kernel) -> str:
    fn = getattr(kernel, "fn", kernel)  # an Autotuner wraps the JITFunction
    return getattr(fn, "__name__", None) or fn.fn.__name__


def cost_model(*kernels):
    """Declares ``f(args) -> [Part]`` as the plan's cost model of ``kernels`` (used next to the launcher)."""
    def register(f):
        for k in kernels:
            MODELS[kernel_name(k)] = f
        return f
    return register


def nbytes(t: torch.Tensor, elements: Optional[int] = None) -> int:
    """Bytes of ``elements`` elements of ``t``'s dtype (all of ``t`` when None)."""
    return (t.numel() if elements is None else int(elements)) * t.element_size()


def cdiv(a: int, b: int) -> int:
    return -(-int(a) // int(b))


@dataclasses.dataclass
class Launch:
    """One planned launch (for an autotuned kernel, one per configuration): every figure an estimate."""

    kernel: str
    config: Dict[str, int]  # the autotune configuration (empty when not autotuned)
    grid: tuple
    programs: int
    block: Dict[str, int]
    parts: List[Part]
    lanes: int  # the fewest active lanes of any part's program
    serial: int  # the longest serial loop of any program
    read: int
    written: int
    flops: int
    dot: str  # how the matrix work multiplies (rate row of DEVICES)
    site: int = 0  # which launch of the call (autotuned: one site, several configurations)
    stage: str = ""  # inference, forward or backward
    est_us: float = 0.0
    flagged: List[str] = dataclasses.field(default_factory=list)  # parts that break the fill rule (see MIN_WAVES)

    def estimate(self, device: Device) -> None:
        bound = max((self.read + self.written) / (device.hbm_gbps * 1e9),
                    self.flops / (device.tflops[self.dot] * 1e12))
        fill = min(1.0, self.programs / device.sms) if self.programs else 1.0
        self.est_us = bound / fill * 1e6
        # Programs that loop longer than SERIAL_LIMIT steps are the launch's critical path: too few of them
        # leave the GPU idle behind them, whatever else the launch runs.
        self.flagged = [p.what for p in self.parts
                        if p.programs < MIN_WAVES * device.sms and p.serial > SERIAL_LIMIT]


_DOT = {0: "fp64", 1: "half", 2: "fp32", 3: "tf32"}


def _bind(fn, args: Sequence, meta: dict) -> dict:
    bound, positional = dict(meta), iter(args)
    for name in fn.arg_names:
        if name not in meta:
            bound[name] = next(positional)
    return bound


class Recorder:
    """Stands in for ``launch._launch``: each launch becomes one ``Launch`` per autotune configuration."""

    def __init__(self):
        self.launches: List[Launch] = []
        self.stage = ""  # set by the caller: inference, forward, backward
        self.sites = 0

    def __call__(self, kernel, grid, *args, **meta):
        from triton.runtime.autotuner import Autotuner

        fn, configs = kernel, [({}, {})]
        if isinstance(kernel, Autotuner):
            fn = kernel.fn
            configs = [(dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages), c.kwargs)
                       for c in kernel.configs]
        name = kernel_name(fn)
        model = MODELS.get(name)
        if model is None:
            raise KeyError(f"the launch plan has no cost model for {name} (declare one with @cost_model)")
        self.sites += 1
        for label, kwargs in configs:
            a = _bind(fn, args, dict(meta, **kwargs))
            g = tuple(grid(a) if callable(grid) else grid)
            parts = [p for p in model(a) if p.programs > 0]
            if len({p.what for p in parts}) < len(parts):  # alike branches: named by their place in the launch
                parts = [dataclasses.replace(p, what=f"{p.what} #{i}") for i, p in enumerate(parts)]
            programs = math.prod(g)
            assert programs == sum(p.programs for p in parts), (name, g, parts)
            block = {k: v for k, v in a.items() if k.startswith("BLOCK_") or k in ("RH", "RW")}
            self.launches.append(Launch(
                kernel=name, config=label, grid=g, programs=programs, block=block, parts=parts,
                lanes=min(p.lanes for p in parts), serial=max(p.serial for p in parts),
                read=sum(p.read for p in parts), written=sum(p.written for p in parts),
                flops=sum(p.flops for p in parts), dot=_DOT[a.get("DOT", 3 if not a.get("F64") else 0)],
                site=self.sites, stage=self.stage))


@contextlib.contextmanager
def recording() -> Iterator[Recorder]:
    """Launches of the real launchers recorded, not run, while inside."""
    from . import launch

    recorder, real = Recorder(), launch._launch
    launch._launch = recorder
    try:
        yield recorder
    finally:
        launch._launch = real


def _call_args(module):
    """The operator's arguments for ``module`` (a fused block), as the functional layer builds them: weights,
    biases, each norm's (scale, shift, batch statistics or not, eps), the block's configuration."""
    from ..functional import _norm_epilogue

    norms = [_norm_epilogue(branch.conv, branch.norm) for branch in module.branches]
    weight = [branch.conv.weight for branch in module.branches]
    bias, scale, shift, stats, eps = (list(v) for v in zip(*norms))
    return weight, bias, scale, shift, stats, eps, module.spec.op_args()


@dataclasses.dataclass
class Plan:
    """Every launch of one call (estimates), the device they are estimated on, and what was planned."""

    title: str
    device: Device
    launches: List[Launch]
    omitted: List[str] = dataclasses.field(default_factory=list)  # work of the call this plan does not cover

    def best(self) -> List[Launch]:
        """One launch per launch site: for autotuned ones the configuration with the least estimated time."""
        out, seen = [], {}
        for lc in self.launches:
            key = lc.site
            if key in seen:
                if lc.est_us < out[seen[key]].est_us:
                    out[seen[key]] = lc
            else:
                seen[key] = len(out)
                out.append(lc)
        return out

    @property
    def est_us(self) -> float:
        return sum(lc.est_us for lc in self.best())


def plan_block(module, x_shape, dtype: torch.dtype = torch.float32, mode: str = "inference",
               device: str = "H100", title: str = "") -> Plan:
    """The plan of one call of ``module`` (a fused block built on the meta device, ``with
    torch.device('meta')``) on an input of ``x_shape`` in ``dtype``: ``mode`` 'inference' (eval, no
    gradient: the inference launcher) or 'train' (train-mode norms, forward and backward of x and every
    parameter)."""
    from . import launch

    if any(t.device.type != "meta" for t in module.state_dict().values()):
        raise ValueError("plan_block takes a module built on the meta device (with torch.device('meta'))")

    if launch.interpreting():
        raise RuntimeError("the launch plan needs the GPU kernels' launch parameters: run it with "
                           "TRITON_INTERPRET unset (python -m msfused explain re-runs itself so)")
    if mode not in ("inference", "train"):
        raise ValueError(f"mode must be 'inference' or 'train', got {mode!r}")
    dev = DEVICES[device]
    module = module.to(device="meta", dtype=dtype).train(mode == "train")
    x = torch.empty(x_shape, dtype=dtype, device="meta")
    weight, bias, scale, shift, stats, eps, args = _call_args(module)
    with torch.no_grad(), recording() as rec:
        if mode == "inference":
            rec.stage = "inference"
            launch.inference(x, weight, bias, scale, shift, **args)
        else:
            rec.stage = "forward"
            out, level, pre, mean, var = launch.forward(x, weight, bias, scale, shift, stats, eps, **args)
            rec.stage = "backward"
            launch.backward(torch.empty_like(out), x, weight, scale, shift, level, pre, mean, var, stats, eps,
                            **args, output_mask=[True, True])
    for lc in rec.launches:
        lc.estimate(dev)
    omitted = []
    if getattr(module, "project", None) is not None:
        omitted.append("the projection (project=): its convolutions (cuDNN, through ATen) and its Triton passes "
                       "(project_epilogue_kernel, gather_kernel, act_grad_kernel) are not in this plan yet; the "
                       "launches above are the block's alone")
    return Plan(title, dev, rec.launches, omitted)


def plan_workload(name: str, mode: str = "inference", dtype: torch.dtype = torch.float32, device: str = "H100",
                  n: Optional[int] = None) -> Plan:
    """The plan of one call of a WORKLOADS.md workload at its full batch size (or ``n``)."""
    from ..bench.workloads import WORKLOADS

    w = WORKLOADS[name]
    n = w.n if n is None else n
    with torch.device("meta"):
        module = w.fused_class(w.channels, **w.config)
    return plan_block(module, w.input_shape(n), dtype, mode, device,
                      title=f"{name} N={n} {mode} {str(dtype).replace('torch.', '')}")


def as_dict(plan: Plan) -> dict:
    best = {id(lc) for lc in plan.best()}
    return dict(
        title=plan.title, device=dataclasses.asdict(plan.device), note="every figure is an estimate from the code",
        omitted=plan.omitted, launch_count=len(plan.best()), est_us=plan.est_us,
        launches=[dict(dataclasses.asdict(lc), chosen=id(lc) in best) for lc in plan.launches],
    )


def format_plan(plan: Plan) -> str:
    """The plan as a table (every launch; autotuned ones once per configuration, * the fastest estimate)."""
    d = plan.device
    lines = [f"launch plan of {plan.title} on {d.name} ({d.sms} SMs, {d.hbm_gbps:.0f} GB/s): ESTIMATES from the "
             f"code, not measurements; fill = min(1, programs / SMs); ! = fewer than {MIN_WAVES}x{d.sms} programs "
             f"while a program loops over {SERIAL_LIMIT} steps",
             f"{'#':>2} {'stage':<9} {'kernel':<20} {'config':<24} {'grid':<14} {'programs':>8} {'lanes':>6} "
             f"{'serial':>7} {'MB read':>8} {'MB wr':>7} {'GFLOP':>7} {'est us':>8}"]
    best = {id(lc) for lc in plan.best()}
    for lc in plan.launches:
        cfg = ",".join(f"{k}={v}" for k, v in lc.config.items() if k not in ("num_warps", "num_stages"))
        if lc.config:
            cfg += f",w{lc.config.get('num_warps')}s{lc.config.get('num_stages')}"
        mark = ("*" if lc.config and id(lc) in best else " ") + ("!" if lc.flagged else " ")
        lines.append(f"{lc.site:>2} {lc.stage:<9} {lc.kernel:<20} {cfg[:24]:<24} {str(lc.grid):<14} {lc.programs:>8} "
                     f"{lc.lanes:>6} {lc.serial:>7} {lc.read / 1e6:>8.2f} {lc.written / 1e6:>7.2f} "
                     f"{lc.flops / 1e9:>7.2f} {lc.est_us:>8.1f}{mark}")
    chosen = plan.best()
    lines.append(f"{len(chosen)} launches; estimated {plan.est_us:.1f} us on {d.name} (the fastest configuration of "
                 f"each autotuned launch; launch overhead not included)")
    lines += [f"NOT PLANNED: {what}" for what in plan.omitted]
    return "\n".join(lines)


def run_without_interpreter(argv: Sequence[str]) -> int:
    """Runs ``python -m msfused explain argv`` in a process with Triton's interpreter off (the plan needs the
    GPU kernels' launch parameters, which the interpreter replaces)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.call([sys.executable, "-m", "msfused", "explain", *argv], env=env)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m msfused explain WORKLOAD [--backend triton|cuda] [--mode inference|train] [--dtype D]
    [--device H100|H200] [--n N] [--json]``: the launch plan of one call (estimates)."""
    import argparse
    import json

    from ..bench.workloads import WORKLOADS

    parser = argparse.ArgumentParser(
        prog="python -m msfused explain",
        description="Every kernel launch one call of a workload would make, at its real sizes, recorded from the "
                    "real launchers on meta tensors (no GPU, nothing run): grid, programs, block, active lanes, the "
                    "longest serial loop of a program, bytes, FLOPs and an estimated time. Every figure is an "
                    "estimate from the code, not a measurement.")
    parser.add_argument("workload", choices=list(WORKLOADS), help="a workload of WORKLOADS.md")
    parser.add_argument("--backend", choices=("triton", "cuda"), default="triton")
    parser.add_argument("--mode", choices=("inference", "train"), default="inference")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16", "float64"), default="float32")
    parser.add_argument("--device", choices=list(DEVICES), default="H100", help="the GPU the times are estimated on")
    parser.add_argument("--n", type=int, default=None, help="batch size (default: the workload's full N)")
    parser.add_argument("--json", action="store_true", help="the plan as JSON")
    opts = parser.parse_args(argv)
    if opts.backend == "cuda":  # recorded from the launchers' emulation build (msfused/cuda_plan.py)
        from ..cuda_plan import explain

        return explain(opts)
    from . import launch

    if launch.interpreting():
        return run_without_interpreter(argv if argv is not None else sys.argv[2:])
    plan = plan_workload(opts.workload, opts.mode, getattr(torch, opts.dtype), opts.device, opts.n)
    print(json.dumps(as_dict(plan), indent=1) if opts.json else format_plan(plan))
    return 0


def survey(workloads: Optional[Sequence[str]] = None, modes=("inference", "train"),
           dtypes=(torch.float32, torch.bfloat16), device: str = "H100") -> List[dict]:
    """One summary per (workload, mode, dtype): launches, the fewest programs of a launch, the estimated time
    and every part of every planned launch (each autotune configuration) that breaks the fill rule."""
    from ..bench.workloads import WORKLOADS

    rows = []
    for name in workloads or list(WORKLOADS):
        for mode in modes:
            for dtype in dtypes:
                p = plan_workload(name, mode, dtype, device)
                best = p.best()
                rows.append(dict(
                    workload=name, mode=mode, dtype=str(dtype).replace("torch.", ""), omitted=p.omitted,
                    launches=len(best),
                    min_programs=min(lc.programs for lc in best), est_us=p.est_us,
                    max_serial=max(lc.serial for lc in p.launches),
                    flagged=[dict(kernel=lc.kernel, config=lc.config, part=part, programs=pt.programs,
                                  serial=pt.serial)
                             for lc in p.launches for part in lc.flagged for pt in lc.parts if pt.what == part]))
    return rows
