"""The launch plan: every Triton launch one call of the block would make, recorded without a GPU.

The real launchers (``launch.py``) run on meta tensors with the launch itself replaced by a recorder, so
nothing is computed and nothing is allocated; each recorded launch is described by the cost model its
kernel declares next to its launcher (``@cost_model(kernel)`` in ``launch.py``): per program the active
lanes and the longest serial loop, per launch the bytes read and written and the matrix FLOPs. An
estimated time on a named device (``DEVICES``) follows::

    time = max(bytes / HBM bandwidth, FLOPs / matrix rate) / fill,   fill = min(1, programs / SMs)

Every figure of the plan is an estimate from the code, not a measurement. Autotuned kernels are planned
once per configuration of their list. ``python -m msfused explain WORKLOAD`` prints it.

A block with a projection (``project=``, the head workloads) runs ATen kernels too: its convolutions (cuDNN
on a GPU) and torch's reductions and elementwise ops (batch statistics, the norms' gradient sums). The
recorder does not see those (they are not launched through ``launch._launch``), so a ``TorchDispatchMode``
on the meta tensors (``AtenRecorder``) records each ATen op that computes as one launch of a library
(``Launch.library``: 'cuDNN' for a convolution, 'ATen' otherwise): bytes of its tensors, a convolution's
FLOPs from the shapes at the matrix rate its dtype gets (``_dot_of``: half precision on tensor cores,
float32 as TF32 where ``torch.backends.cudnn.allow_tf32`` allows, torch's default), its grid not modelled
(the library chooses it: taken as filling the device, and outside the fill rule).
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
from torch.utils._python_dispatch import TorchDispatchMode

from .._ops import level_backward_grad_x, level_backward_inputs


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
    """Ceiling division on the host, for the launchers too: triton.cdiv is a constexpr function in Triton 3.6,
    about 3 us a call from Python, and a launcher makes dozens (SymInts pass through: torch.compile traces
    the launchers)."""
    return (a + b - 1) // b


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
    # "" for a Triton launch; else the library that runs it ("cuDNN": a convolution, "ATen": torch's own
    # kernel), whose grid it chooses: programs, lanes and serial are 0 (not modelled), the device taken as
    # filled (estimate), and the fill rule does not apply.
    library: str = ""

    def estimate(self, device: Device) -> None:
        bound = max((self.read + self.written) / (device.hbm_gbps * 1e9),
                    self.flops / (device.tflops[self.dot] * 1e12))
        fill = min(1.0, self.programs / device.sms) if self.programs else 1.0
        self.est_us = bound / fill * 1e6
        # Programs that loop longer than SERIAL_LIMIT steps are the launch's critical path: too few of them
        # leave the GPU idle behind them, whatever else the launch runs.
        self.flagged = [p.what for p in self.parts
                        if not self.library and p.programs < MIN_WAVES * device.sms and p.serial > SERIAL_LIMIT]


_DOT = {0: "fp64", 1: "half", 2: "fp32", 3: "tf32", 4: "tf32"}  # (4: three TF32 products, in the FLOPs)


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
        self.paused = False  # (an AtenRecorder ignores the ops of the cost models)

    def __call__(self, kernel, grid, *args, **meta):
        self.paused = True
        try:
            self._record(kernel, grid, args, meta)
        finally:
            self.paused = False

    def _record(self, kernel, grid, args, meta):
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


def _conv_flops(func, args, out) -> int:
    """Matrix FLOPs of an ATen convolution (2 per multiply-add) or of its backward (one forward's FLOPs per
    gradient asked for: the input's and the weight's; the bias's is a sum, no matrix work)."""
    if func.overloadpacket.__name__ == "convolution":
        # convolution(input, weight, bias, stride, padding, dilation, transposed, output_padding, groups)
        x, w, y, transposed, gradients = args[0], args[1], out, args[6], 1
    else:
        # convolution_backward(grad_output, input, weight, bias_sizes, stride, padding, dilation, transposed,
        #                      output_padding, groups, output_mask)
        y, x, w, transposed = args[0], args[1], args[2], args[7]
        gradients = int(bool(args[10][0])) + int(bool(args[10][1]))
    # each element of the output (of the input, transposed) takes weight.shape[1] * kh * kw multiply-adds
    return 2 * (x if transposed else y).numel() * math.prod(w.shape[1:]) * gradients


def _dot_of(dtype: torch.dtype) -> str:
    """The matrix rate a convolution of ``dtype`` gets from cuDNN (a row of DEVICES' rates): half precision on
    tensor cores, float32 as TF32 where torch allows it (``torch.backends.cudnn.allow_tf32``, on by default)."""
    if dtype in (torch.float16, torch.bfloat16):
        return "half"
    if dtype == torch.float64:
        return "fp64"
    return "tf32" if torch.backends.cudnn.allow_tf32 else "fp32"


_CONVOLUTIONS = ("convolution", "convolution_backward")
# Ops that move no data on the device: allocations and metadata.
_NO_WORK = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "detach", "alias",
            "lift_fresh", "lift_fresh_copy", "set_", "resize_", "_local_scalar_dense",
            "_unsafe_view"}  # (a view autograd does not track: reshape's result after its copy)


class AtenRecorder(TorchDispatchMode):
    """Records, as plan entries, the ATen ops that compute on the meta tensors of a recorded call: the
    convolutions (``aten.convolution`` / ``aten.convolution_backward``, cuDNN on a GPU: their FLOPs from the
    shapes at the rate their dtype gets, ``_dot_of``) and torch's own reductions and elementwise kernels
    (bytes only). Views, allocations and ops on other devices (the tap tables' construction on CPU) are
    not recorded. One ATen op is taken as one launch that fills the device (estimates)."""

    def __init__(self, recorder: "Recorder"):
        super().__init__()
        self.recorder = recorder

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.recorder.paused:
            self._record(func, args, kwargs or {}, out)
        return out

    def _record(self, func, args, kwargs, out) -> None:
        name = func.overloadpacket.__name__
        if name in _NO_WORK or getattr(func, "is_view", False):
            return
        ins = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        outs = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        # (a 0-dim CPU tensor in a meta op is a wrapped scalar)
        if not outs or any(t.device.type != "meta" and t.dim() > 0 for t in ins + outs) or \
                sum(t.numel() for t in outs) == 0:
            return
        ins = [t for t in ins if t.device.type == "meta"]
        if name in ("fill_", "zero_"):  # writes its tensor, reads nothing
            ins = []
        elif name == "copy_":  # reads its source only
            ins = ins[1:2]
        read = sum(t.numel() * t.element_size() for t in {id(t): t for t in ins}.values())
        written = sum(t.numel() * t.element_size() for t in outs)
        conv = name in _CONVOLUTIONS
        flops = _conv_flops(func, args, out) if conv else 0
        dtype = (ins[0] if ins else outs[0]).dtype  # (a convolution's input or output gradient)
        rec = self.recorder
        rec.sites += 1
        rec.launches.append(Launch(
            kernel=f"aten.{name}", config={}, grid=(), programs=0, block={},
            parts=[Part(str(func.name()), 0, 0, 0, read, written, flops)], lanes=0, serial=0, read=read,
            written=written, flops=flops, dot=_dot_of(dtype) if conv else "fp32", site=rec.sites, stage=rec.stage,
            library="cuDNN" if conv else "ATen"))


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

    half = next(module.parameters()).dtype in (torch.float16, torch.bfloat16)  # as _half_precision on x
    norms = [_norm_epilogue(branch.conv, branch.norm, half) for branch in module.branches]
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
    kernels: str = "Triton"  # what the plan's own (not a library's) launches are

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
    parameter). A block with a projection is planned as the Triton backend runs it (``_record_projection``)."""
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
    with torch.no_grad(), recording() as rec:
        if getattr(module, "project", None) is not None:
            _record_projection(rec, module, x, mode)
        elif mode == "inference":
            weight, bias, scale, shift, stats, eps, args = _call_args(module)
            rec.stage = "inference"
            launch.inference(x, weight, bias, scale, shift, **args)
        else:
            weight, bias, scale, shift, stats, eps, args = _call_args(module)
            rec.stage = "forward"
            out, level, pre, mean, var = launch.forward(x, weight, bias, scale, shift, stats, eps, **args)
            rec.stage = "backward"
            block = (args["factor"], args["bins"], args["input_position"])
            with AtenRecorder(rec):  # the upstream gradient's sum where autograd takes the 1x1 problem
                grad, op_x = level_backward_inputs(torch.empty_like(out), x, level, *block)
            grad_x = launch.backward(grad, op_x, weight, scale, shift, level, pre, mean, var, stats, eps,
                                     **args, output_mask=[True, True])[0]
            with AtenRecorder(rec):
                level_backward_grad_x(grad_x, x, *block)
    for lc in rec.launches:
        lc.estimate(dev)
    return Plan(title, dev, rec.launches)


def _record_projection(rec: Recorder, module, x: torch.Tensor, mode: str) -> None:
    """Records one call of a block with a projection (``project=``) as the Triton backend runs it: the
    operators' bodies (``projection.project_forward``, and ``project_backward`` for 'train'), their Triton
    launches through the recorder and their ATen ops (the convolutions, torch's reductions and elementwise
    kernels) through an ``AtenRecorder`` on the meta tensors. The arguments are the functional layer's
    (``functional._fused_project_forward``); its parameter-sized work outside the operators (the eval norm's
    folding, cached per parameter version, and the running statistics' update) is not planned, as for the
    blocks without a projection."""
    from ..functional import _norm_epilogue
    from . import projection

    weight, bias, scale, shift, stats, eps, args = _call_args(module)
    half = module.project.conv.weight.dtype in (torch.float16, torch.bfloat16)  # as _half_precision on x
    p_bias, p_scale, p_shift, p_stats, p_eps = _norm_epilogue(module.project.conv, module.project.norm, half)
    p_act = module.spec.project.op_args()["project_activation"]
    pw = module.project.conv.weight
    train = mode == "train"
    with AtenRecorder(rec):
        rec.stage = "forward" if train else "inference"
        out, level, pre, mean, var, p_pre, p_mean, p_var = projection.project_forward(
            x, weight, bias, scale, shift, stats, eps, **args, pw=pw, p_bias=p_bias, p_scale=p_scale, p_shift=p_shift,
            p_batch_stats=p_stats, p_eps=p_eps, p_activation=p_act, save_pre=train)
        if train:
            rec.stage = "backward"
            projection.project_backward(
                torch.empty_like(out), x, weight, scale, shift, level, pre, mean, var, stats, eps, **args, pw=pw,
                p_scale=p_scale, p_shift=p_shift, p_pre=p_pre, p_mean=p_mean, p_var=p_var, p_batch_stats=p_stats,
                p_eps=p_eps, p_activation=p_act, output_mask=[True, True])


def plan_workload(name: str, mode: str = "inference", dtype: torch.dtype = torch.float32, device: str = "H100",
                  n: Optional[int] = None, planner: Optional[Callable] = None, backend: str = "") -> Plan:
    """The plan of one call of a WORKLOADS.md workload at its full batch size (or ``n``), by ``planner`` (a
    ``plan_block`` of the same signature; default the Triton one), titled with ``backend`` where given."""
    from ..bench.workloads import WORKLOADS

    w = WORKLOADS[name]
    n = w.n if n is None else n
    with torch.device("meta"):
        module = w.fused_class(w.channels, **w.config)
    title = f"{name} N={n} {mode} {str(dtype).replace('torch.', '')}" + (f" (backend {backend})" if backend else "")
    return (planner or plan_block)(module, w.input_shape(n), dtype, mode, device, title=title)


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
             f"{'#':>2} {'stage':<9} {'kernel':<25} {'config':<24} {'grid':<14} {'programs':>8} {'lanes':>6} "
             f"{'serial':>7} {'MB read':>8} {'MB wr':>7} {'GFLOP':>7} {'est us':>8}"]
    best = {id(lc) for lc in plan.best()}
    for lc in plan.launches:
        cfg = ",".join(f"{k}={v}" for k, v in lc.config.items() if k not in ("num_warps", "num_stages"))
        if lc.config:
            cfg += f",w{lc.config.get('num_warps')}s{lc.config.get('num_stages')}"
        mark = ("*" if lc.config and id(lc) in best else " ") + ("!" if lc.flagged else " ")
        if lc.library:  # the library chooses its grid: not modelled
            cfg = f"{lc.library}" + (f", {lc.dot}" if lc.flops else "")
            shape = f"{'-':<14} {'-':>8} {'-':>6} {'-':>7}"
        else:
            shape = f"{str(lc.grid):<14} {lc.programs:>8} {lc.lanes:>6} {lc.serial:>7}"
        lines.append(f"{lc.site:>2} {lc.stage:<9} {lc.kernel:<25} {cfg[:24]:<24} {shape} {lc.read / 1e6:>8.2f} "
                     f"{lc.written / 1e6:>7.2f} {lc.flops / 1e9:>7.2f} {lc.est_us:>8.1f}{mark}")
    chosen = plan.best()
    triton_count = sum(1 for lc in chosen if not lc.library)
    lines.append(f"{len(chosen)} launches ({triton_count} {plan.kernels}, {len(chosen) - triton_count} cuDNN / ATen); "
                 f"estimated {plan.est_us:.1f} us on {d.name} (the fastest configuration of each autotuned launch; "
                 f"a library's launch taken as filling the device; launch overhead not included)")
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
    """One summary per (workload, mode, dtype): launches (all; Triton; cuDNN convolutions with their FLOPs and
    matrix rates), the fewest programs of a Triton launch, the estimated time and every part of every planned
    launch (each autotune configuration) that breaks the fill rule."""
    from ..bench.workloads import WORKLOADS

    rows = []
    for name in workloads or list(WORKLOADS):
        for mode in modes:
            for dtype in dtypes:
                p = plan_workload(name, mode, dtype, device)
                best = p.best()
                kernels = [lc for lc in best if not lc.library]
                convs = [lc for lc in best if lc.library == "cuDNN"]
                rows.append(dict(
                    workload=name, mode=mode, dtype=str(dtype).replace("torch.", ""), omitted=p.omitted,
                    launches=len(best), triton_launches=len(kernels),
                    triton_kernels=sorted({lc.kernel for lc in kernels}),
                    conv_launches=len(convs), conv_flops=sum(lc.flops for lc in convs),
                    conv_rates=sorted({lc.dot for lc in convs}),
                    min_programs=min(lc.programs for lc in kernels), est_us=p.est_us,
                    max_serial=max(lc.serial for lc in p.launches),
                    flagged=[dict(kernel=lc.kernel, config=lc.config, part=part, programs=pt.programs,
                                  serial=pt.serial)
                             for lc in p.launches for part in lc.flagged for pt in lc.parts if pt.what == part]))
    return rows


def survey_table(dtype: torch.dtype = torch.bfloat16, device: str = "H100", backend: str = "triton") -> str:
    """README.md's launch-plan table of ``backend`` ('triton', or 'cuda': ``msfused.cuda_plan``, from the
    emulation build), from its ``survey``: per workload of WORKLOADS.md its launches (the backend's kernels,
    + cuDNN / ATen calls), the fewest programs of one of its kernel launches, the floor and the estimated time
    over the floor at the device's data-sheet rates (``max(bytes / HBM bandwidth, convolution FLOPs / matrix
    rate)``, WORKLOADS.md's work count, ``bench.floor.count_work``), inference / train. Every figure an
    estimate: ``python bench/update_readme.py`` writes them into README.md."""
    from ..bench.floor import count_work
    from ..bench.workloads import WORKLOADS

    if backend == "cuda":
        from ..cuda_plan import survey as cuda_survey

        label = "CUDA kernel"
        summaries = [(r, r["kernels"], r["library"]) for r in cuda_survey(dtypes=(dtype,), device=device)]
    elif backend == "triton":
        label = "Triton"
        summaries = [(r, r["triton_launches"], r["launches"] - r["triton_launches"])
                     for r in survey(dtypes=(dtype,), device=device)]
    else:
        raise ValueError(f"backend must be 'triton' or 'cuda', got {backend!r}")
    dev = DEVICES[device]
    rows = {}
    for r, kernels, library in summaries:
        w = WORKLOADS[r["workload"]]
        work = count_work(w, w.n, r["mode"], dtype)
        floor_us = max(work.bytes / (dev.hbm_gbps * 1e9), work.flops / (dev.tflops[_dot_of(dtype)] * 1e12)) * 1e6
        rows.setdefault(r["workload"], []).append((
            f"{kernels}" + (f" + {library}" if library else ""), str(r["min_programs"]),
            f"{r['est_us'] / floor_us:.1f}", f"{floor_us:.0f}"))
    lines = [f"| workload | launches inference / train ({label}s + cuDNN / ATen) | fewest programs of a {label} "
             "launch, inference / train | floor, inference / train (µs) | estimated time / floor, inference / train |",
             "| --- | --- | --- | --- | --- |"]
    for name, (inf, train) in rows.items():
        lines.append(f"| `{name}` | {inf[0]} / {train[0]} | {inf[1]} / {train[1]} | {inf[3]} / {train[3]} | "
                     f"{inf[2]} / {train[2]} |")
    return "\n".join(lines)
