"""The CUDA C++ backend without a GPU: its emulation build, and its launch plan.

**The emulation build.** ``csrc/cuda/multi_scale_kernels.cu`` and the binding ``multi_scale_cuda.cpp``
compiled with the host compiler and ``-DMSFUSED_CUDA_EMULATION`` (``csrc/cuda/emulation.h``: blocks in order,
a block's threads an OpenMP team), registered as the operators ``torch.ops.msfused_cuda_emulation.*`` over
CPU tensors. It needs the CUDA toolkit's headers (not a GPU, not the CUDA runtime) and a source checkout (the
``csrc/`` folder). :func:`emulation_library` builds it once with ``torch.utils.cpp_extension`` and ninja into a
cache folder (ninja rebuilds what changed) and loads it; ``tests/test_cuda_emulation.py`` checks its outputs
against the CPU kernels, and the launch plan below records its launchers.

**The launch plan** (``python -m msfused explain WORKLOAD --backend cuda``): one call of the block (and its
projection) at the workload's full size through the emulation build's operators on meta tensors, with the
launchers' record-only mode on (``start_recording`` / ``stop_recording``: every ``launch_*`` function of the
.cu records its kernel, grid, block, dynamic shared memory and its cost model's figures, from its own
arithmetic, and launches nothing; the binding's ATen convolutions are recorded with their FLOPs and bytes).
The launchers size their grids for the planned device's multiprocessor count and the GPU build's chunking,
so the plan is the GPU build's, from the same launcher source. Figures are read into the Triton plan's
types (``msfused/triton/plan.py``: ``Part``, ``Launch``, ``Plan``) and estimated the same way; every figure
is an estimate from the code, not a measurement.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import List, Optional, Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"

#: ATen work of a call the plan leaves out (in every CUDA plan's ``omitted``).
NOT_PLANNED = ("ATen's small passes around the kernels (per-channel parameter casts, the parameter gradients' "
               "casts and copies, bfloat16 / float16 casts of level-sized activations to the per-tap maps' "
               "float32); the convolutions' grids are cuDNN's: their estimates assume they fill the device")


class EmulationUnavailable(RuntimeError):
    """The emulation build cannot be made here (no CUDA headers, or no source checkout)."""


def cuda_include() -> Optional[Path]:
    """The CUDA toolkit's include folder (cuda_runtime_api.h, cuda_fp16.h): next to nvcc, or under
    $CUDA_HOME (default /usr/local/cuda); None when not found."""
    nvcc = shutil.which("nvcc")
    candidates = [Path(nvcc).resolve().parents[1] / "include"] if nvcc else []
    candidates += [Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "include"]
    for c in candidates:
        if (c / "cuda_runtime_api.h").exists() and (c / "cuda_fp16.h").exists():
            return c
    return None


def unavailable_reason() -> Optional[str]:
    """Why the emulation build cannot be made here, or None when it can."""
    if not (CSRC / "cuda" / "multi_scale_kernels.cu").exists():
        return f"the CUDA sources (csrc/cuda) are not in {ROOT}: it needs a source checkout of msfused"
    if cuda_include() is None:
        return ("the CUDA toolkit's headers (cuda_runtime_api.h, cuda_fp16.h) are not found: install the CUDA "
                "toolkit (no GPU needed), put its nvcc on PATH or set CUDA_HOME")
    return None


def build_directory() -> Path:
    """Where the emulation library is built and cached: $MSFUSED_CUDA_EMULATION_BUILD, else a folder per
    source checkout under torch's extension cache ($TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions)."""
    if os.environ.get("MSFUSED_CUDA_EMULATION_BUILD"):
        return Path(os.environ["MSFUSED_CUDA_EMULATION_BUILD"])
    cache = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")
    digest = hashlib.sha1(str(ROOT).encode()).hexdigest()[:12]
    return cache / f"msfused_cuda_emulation_{digest}"


_LOADED: Optional[Path] = None


def emulation_library(verbose: bool = False) -> Path:
    """Builds (ninja: only what changed) and loads the emulation library; returns its path. Its operators are
    then ``torch.ops.msfused_cuda_emulation.*``. Raises EmulationUnavailable when it cannot be built here."""
    global _LOADED
    if _LOADED is not None:
        return _LOADED
    reason = unavailable_reason()
    if reason is not None:
        raise EmulationUnavailable(reason)
    from torch.utils import cpp_extension

    build = build_directory()
    build.mkdir(parents=True, exist_ok=True)
    wrapper = build / "kernels_emulated.cpp"  # the .cu as C++
    text = f'#include "{CSRC / "cuda" / "multi_scale_kernels.cu"}"\n'
    if not wrapper.exists() or wrapper.read_text() != text:
        wrapper.write_text(text)
    cpp_extension.load(
        name="msfused_cuda_emulation",
        sources=[str(wrapper), str(CSRC / "cuda" / "multi_scale_cuda.cpp"), str(CSRC / "block_config.cpp"),
                 str(CSRC / "projection.cpp")],
        extra_cflags=["-DMSFUSED_CUDA_EMULATION", "-O2", "-std=c++17", "-fopenmp", "-Wno-unknown-pragmas"],
        extra_include_paths=[str(CSRC), str(cuda_include())],
        extra_ldflags=["-fopenmp"],
        build_directory=str(build),
        is_python_module=False,  # loads it: torch.ops.msfused_cuda_emulation
        with_cuda=False,
        verbose=verbose,
    )
    lib = build / "msfused_cuda_emulation.so"
    if not lib.exists():
        raise EmulationUnavailable(f"the emulation build left no {lib.name} in {build}")
    _LOADED = lib
    return lib


# ---------------------------------------------------------------------------------------------------
# The launch plan
# ---------------------------------------------------------------------------------------------------

def _launches(records: List[dict], stage: str, first_site: int) -> list:
    """The recorded launches (stop_recording's JSON) as the plan's Launch objects."""
    from .triton.plan import Launch, Part

    out = []
    for i, r in enumerate(records):
        parts = [Part(p["what"], p["programs"], p["lanes"], p["serial"], p["read"], p["written"], p["flops"])
                 for p in r["parts"]]
        assert r["grid"] == sum(p.programs for p in parts), r  # the cost model covers every block
        out.append(Launch(
            kernel=r["kernel"], config={}, grid=(r["grid"],) if r["grid"] else (), programs=r["grid"],
            block=dict(threads=r["threads"], shared_bytes=r["shared_bytes"]) if r["grid"] else {},
            parts=parts, lanes=min(p.lanes for p in parts), serial=max(p.serial for p in parts),
            read=sum(p.read for p in parts), written=sum(p.written for p in parts),
            flops=sum(p.flops for p in parts), dot=r["dot"] or "fp32", site=first_site + i, stage=stage))
    return out


def is_library_call(launch) -> bool:
    """Whether a planned launch is an ATen call (a cuDNN convolution, a sum), whose grid the library picks."""
    return launch.programs == 0


def plan_block(module, x_shape, dtype: torch.dtype = torch.float32, mode: str = "inference",
               device: str = "H100", title: str = "", channels_last: bool = False):
    """The CUDA backend's plan of one call of ``module`` (a fused block built on the meta device) on an input of
    ``x_shape`` in ``dtype``: ``mode`` 'inference' (eval, no gradient) or 'train' (train-mode norms, forward and
    backward of x and every parameter), as msfused.functional calls the operators. Returns a
    ``msfused.triton.plan.Plan`` (every figure an estimate)."""
    from .functional import _norm_epilogue
    from .triton.plan import DEVICES, Plan, _call_args

    if mode not in ("inference", "train"):
        raise ValueError(f"mode must be 'inference' or 'train', got {mode!r}")
    if any(t.device.type != "meta" for t in module.state_dict().values()):
        raise ValueError("plan_block takes a module built on the meta device (with torch.device('meta'))")
    dev = DEVICES[device]
    emulation_library()
    ops = torch.ops.msfused_cuda_emulation
    train = mode == "train"
    module = module.to(device="meta", dtype=dtype).train(train)
    x = torch.empty(x_shape, dtype=dtype, device="meta")
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight, bias, scale, shift, stats, eps, args = _call_args(module)
    config = (stats, eps, *args.values())
    project = getattr(module, "project", None)
    launches: list = []

    def recorded(stage, call):
        ops.start_recording(dev.sms)
        try:
            result = call()
        finally:
            records = json.loads(ops.stop_recording())
        launches.extend(_launches(records, stage, len(launches) + 1))
        return result

    with torch.no_grad():
        if project is None:
            fwd = recorded("inference" if not train else "forward",
                           lambda: ops.multi_scale_forward(x, weight, bias, scale, shift, *config))
            if train:
                out, level, pre, mean, var = fwd
                recorded("backward", lambda: ops.multi_scale_backward(
                    torch.empty_like(out), x, weight, scale, shift, level, pre, mean, var, *config, [True, True]))
        else:
            pw = project.conv.weight
            p_bias, p_scale, p_shift, p_stats, p_eps = _norm_epilogue(project.conv, project.norm)
            pconf = tuple(module.spec.project.op_args().values())
            fwd = recorded("inference" if not train else "forward", lambda: ops.multi_scale_project_forward(
                x, weight, bias, scale, shift, *config, pw, p_bias, p_scale, p_shift, p_stats, p_eps, *pconf, train))
            if train:
                out, level, pre, mean, var, p_pre, p_mean, p_var = fwd
                recorded("backward", lambda: ops.multi_scale_project_backward(
                    torch.empty_like(out), x, weight, scale, shift, level, pre, mean, var, *config, pw, p_scale,
                    p_shift, p_pre, p_mean, p_var, p_stats, p_eps, *pconf, [True, True]))
    for lc in launches:
        lc.estimate(dev)
    return Plan(title, dev, launches, [NOT_PLANNED])


def plan_workload(name: str, mode: str = "inference", dtype: torch.dtype = torch.float32, device: str = "H100",
                  n: Optional[int] = None):
    """The CUDA backend's plan of one call of a WORKLOADS.md workload at its full batch size (or ``n``)."""
    from .bench.workloads import WORKLOADS

    w = WORKLOADS[name]
    n = w.n if n is None else n
    with torch.device("meta"):
        module = w.fused_class(w.channels, **w.config)
    return plan_block(module, w.input_shape(n), dtype, mode, device,
                      title=f"{name} N={n} {mode} {str(dtype).replace('torch.', '')} (backend cuda)")


def survey(workloads: Optional[Sequence[str]] = None, modes=("inference", "train"),
           dtypes=(torch.float32, torch.bfloat16), device: str = "H100") -> List[dict]:
    """One summary per (workload, mode, dtype) of the CUDA plan: kernel launches and ATen calls, the fewest
    blocks of a kernel launch, the estimated time, each kernel's launch count and every part of a launch that
    breaks the fill rule (``msfused.triton.plan.MIN_WAVES``)."""
    from .bench.workloads import WORKLOADS

    rows = []
    for name in workloads or list(WORKLOADS):
        for mode in modes:
            for dtype in dtypes:
                p = plan_workload(name, mode, dtype, device)
                kernels = [lc for lc in p.launches if not is_library_call(lc)]
                counts: dict = {}
                for lc in kernels:
                    counts.setdefault(lc.stage, {}).setdefault(lc.kernel, 0)
                    counts[lc.stage][lc.kernel] += 1
                rows.append(dict(
                    workload=name, mode=mode, dtype=str(dtype).replace("torch.", ""),
                    kernels=len(kernels), aten=len(p.launches) - len(kernels), counts=counts,
                    aten_calls=[(lc.stage, lc.kernel) for lc in p.launches if is_library_call(lc)],
                    min_programs=min(lc.programs for lc in kernels), est_us=p.est_us,
                    max_serial=max(lc.serial for lc in kernels),
                    flagged=[dict(kernel=lc.kernel, stage=lc.stage, part=pt.what, programs=pt.programs,
                                  serial=pt.serial)
                             for lc in p.launches for pt in lc.parts if pt.what in lc.flagged]))
    return rows


def explain(opts) -> int:
    """``python -m msfused explain ... --backend cuda`` (the options msfused/triton/plan.py's main parsed)."""
    import sys

    from .triton.plan import as_dict, format_plan

    try:
        plan = plan_workload(opts.workload, opts.mode, getattr(torch, opts.dtype), opts.device, opts.n)
    except EmulationUnavailable as e:
        print(f"python -m msfused explain --backend cuda: the plan is recorded from the CUDA launchers' emulation "
              f"build, which cannot be built here: {e}", file=sys.stderr)
        return 2
    print(json.dumps(as_dict(plan), indent=1) if opts.json else format_plan(plan))
    return 0
