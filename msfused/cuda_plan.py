"""The CUDA C++ backend without a GPU: its emulation build, and its launch plan.

**The emulation build.** ``csrc/cuda/multi_scale_kernels.cu`` and the binding ``multi_scale_cuda.cpp``
compiled with the host compiler and ``-DMSFUSED_CUDA_EMULATION`` (``csrc/cuda/emulation.h``: blocks in order,
a block's threads fibers on the calling thread), registered as the operators ``torch.ops.msfused_cuda_emulation.*`` over
CPU tensors. It needs the CUDA toolkit's headers (not a GPU, not the CUDA runtime) and a source checkout (the
``csrc/`` folder). :func:`emulation_library` builds it once with ``torch.utils.cpp_extension`` and ninja into a
cache folder (ninja rebuilds what changed) and loads it; ``tests/test_cuda_emulation.py`` checks its outputs
against the CPU kernels, and the launch plan below records its launchers.

**The launch plan** (``python -m msfused explain WORKLOAD --backend cuda``): one call of the block (and its
projection) at the workload's full size through the emulation build's operators on meta tensors, with the
launchers' record-only mode on (``start_recording`` / ``stop_recording``: every ``launch_*`` function of the
.cu records its kernel, grid, block, dynamic shared memory and its cost model's figures, from its own
arithmetic, and launches nothing) and, in order with those, the binding's ATen ops (the convolutions with
their FLOPs, torch's own kernels: the Triton plan's ``AtenRecorder``, a dispatch mode on the meta tensors).
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


#: Sanitizers the emulation build can be compiled with (``emulation_library(sanitize=...)``): their compile flags.
SANITIZERS = {"address": ["-fsanitize=address", "-fno-omit-frame-pointer", "-g"]}


def build_directory(sanitize: Optional[str] = None) -> Path:
    """Where the emulation library is built and cached: $MSFUSED_CUDA_EMULATION_BUILD, else a folder per
    source checkout under torch's extension cache ($TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions);
    a sanitized build in a folder of its own beside it."""
    if os.environ.get("MSFUSED_CUDA_EMULATION_BUILD"):
        base = Path(os.environ["MSFUSED_CUDA_EMULATION_BUILD"])
    else:
        cache = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")
        base = cache / f"msfused_cuda_emulation_{hashlib.sha1(str(ROOT).encode()).hexdigest()[:12]}"
    return base if sanitize is None else base.with_name(f"{base.name}_{sanitize}")


def sanitizer_preload(sanitize: str) -> str:
    """LD_PRELOAD for a process that loads a sanitized build: the sanitizer's runtime must come first, and
    libstdc++ with it (ASan's interceptor of C++ throws finds the real one only so)."""
    import subprocess

    libs = {"address": ["libasan.so", "libstdc++.so.6"]}[sanitize]
    return " ".join(subprocess.check_output(["gcc", f"-print-file-name={lib}"], text=True).strip() for lib in libs)


_LOADED: dict = {}


def emulation_library(verbose: bool = False, sanitize: Optional[str] = None) -> Path:
    """Builds (ninja: only what changed) and loads the emulation library; returns its path. Its operators are
    then ``torch.ops.msfused_cuda_emulation.*``. Raises EmulationUnavailable when it cannot be built here.
    ``sanitize='address'``: compiled with AddressSanitizer (out-of-bounds reads and writes of the kernels'
    shared memory, which are static arrays or one heap buffer in this build, and of every tensor show as
    reports); the process must have ``sanitizer_preload('address')`` in LD_PRELOAD."""
    if sanitize is not None and sanitize not in SANITIZERS:
        raise ValueError(f"sanitize must be one of {sorted(SANITIZERS)} or None, got {sanitize!r}")
    if sanitize in _LOADED:
        return _LOADED[sanitize]
    reason = unavailable_reason()
    if reason is not None:
        raise EmulationUnavailable(reason)
    from torch.utils import cpp_extension

    build = build_directory(sanitize)
    build.mkdir(parents=True, exist_ok=True)
    wrapper = build / "kernels_emulated.cpp"  # the .cu as C++
    text = f'#include "{CSRC / "cuda" / "multi_scale_kernels.cu"}"\n'
    if not wrapper.exists() or wrapper.read_text() != text:
        wrapper.write_text(text)
    try:
        cpp_extension.load(
            name="msfused_cuda_emulation",
            sources=[str(wrapper), str(CSRC / "cuda" / "multi_scale_cuda.cpp"), str(CSRC / "block_config.cpp"),
                     str(CSRC / "projection.cpp")],
            extra_cflags=["-DMSFUSED_CUDA_EMULATION", "-O2", "-std=c++17", "-Wno-unknown-pragmas",
                          *SANITIZERS.get(sanitize, [])],
            extra_include_paths=[str(CSRC), str(cuda_include())],
            extra_ldflags=[*SANITIZERS.get(sanitize, [])[:1]],
            build_directory=str(build),
            is_python_module=False,  # loads it: torch.ops.msfused_cuda_emulation
            with_cuda=False,
            verbose=verbose,
        )
    except (RuntimeError, OSError) as e:  # no host compiler or ninja, or a compile error
        raise EmulationUnavailable(f"building it in {build} failed: {e}") from e
    lib = build / "msfused_cuda_emulation.so"
    if not lib.exists():
        raise EmulationUnavailable(f"the emulation build left no {lib.name} in {build}")
    _LOADED[sanitize] = lib
    return lib


# ---------------------------------------------------------------------------------------------------
# The launch plan
# ---------------------------------------------------------------------------------------------------

def _launches(records: List[dict], stage: str) -> list:
    """The recorded kernel launches (stop_recording's JSON) as the plan's Launch objects (site set later)."""
    from .triton.plan import Launch, Part

    out = []
    for r in records:
        parts = [Part(p["what"], p["programs"], p["lanes"], p["serial"], p["read"], p["written"]) for p in r["parts"]]
        if r["grid"] != sum(p.programs for p in parts):  # the cost model covers every block
            raise RuntimeError(f"the cost model of {r['kernel']} covers {sum(p.programs for p in parts)} of its "
                               f"{r['grid']} blocks: {r}")
        out.append(Launch(
            kernel=r["kernel"], config={}, grid=(r["grid"],), programs=r["grid"],
            block=dict(threads=r["threads"], shared_bytes=r["shared_bytes"]), parts=parts,
            lanes=min(p.lanes for p in parts), serial=max(p.serial for p in parts),
            read=sum(p.read for p in parts), written=sum(p.written for p in parts), flops=0, dot="fp32",
            stage=stage))
    return out


def _kernel_recorder(sms: int):
    """A dispatch mode that records one call of the emulation build's operators on meta tensors, in order: the
    kernel launches (the launchers' record-only mode, installed for a device of ``sms`` multiprocessors and
    read back before each ATen op) and the ATen ops of the binding (``msfused.triton.plan.AtenRecorder``: the
    convolutions, cuDNN on a GPU, with their FLOPs, and torch's own kernels), as the plan's launches."""
    import types

    from .triton.plan import AtenRecorder

    ops = torch.ops.msfused_cuda_emulation

    class KernelRecorder(AtenRecorder):
        def __init__(self):
            super().__init__(types.SimpleNamespace(launches=[], sites=0, stage="", paused=False))

        def flush(self) -> None:
            """The kernels launched since the last ATen op (or the start) into the plan, in order."""
            rec = self.recorder
            for lc in _launches(json.loads(ops.stop_recording()), rec.stage):
                rec.sites += 1
                lc.site = rec.sites
                rec.launches.append(lc)
            ops.start_recording(sms)

        def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
            if func.namespace == "msfused_cuda_emulation":  # start_recording, stop_recording
                return func(*args, **(kwargs or {}))
            self.flush()
            return super().__torch_dispatch__(func, types_, args, kwargs)

        def __enter__(self):
            ops.start_recording(sms)
            return super().__enter__()

        def __exit__(self, *exc):
            try:
                self.flush()
            finally:
                ops.stop_recording()
            return super().__exit__(*exc)

    return KernelRecorder()


def plan_block(module, x_shape, dtype: torch.dtype = torch.float32, mode: str = "inference",
               device: str = "H100", title: str = "", channels_last: bool = False):
    """The CUDA backend's plan of one call of ``module`` (a fused block built on the meta device) on an input of
    ``x_shape`` in ``dtype``: ``mode`` 'inference' (eval, no gradient) or 'train' (train-mode norms, forward and
    backward of x and every parameter), with the operators' arguments msfused.functional gives them (its
    parameter-sized work outside the operators, the eval norm's folding and the running statistics' update,
    is not planned, as in the Triton plan). Returns a ``msfused.triton.plan.Plan`` (every figure an
    estimate)."""
    from ._ops import level_backward_grad_x, level_backward_inputs
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
    if project is not None:
        pw = project.conv.weight
        p_bias, p_scale, p_shift, p_stats, p_eps = _norm_epilogue(project.conv, project.norm)
        pconf = tuple(module.spec.project.op_args().values())
    recorder = _kernel_recorder(dev.sms)
    rec = recorder.recorder
    with torch.no_grad(), recorder:
        rec.stage = "forward" if train else "inference"
        if project is None:
            out, level, pre, mean, var = ops.multi_scale_forward(x, weight, bias, scale, shift, *config)
        else:
            out, level, pre, mean, var, p_pre, p_mean, p_var = ops.multi_scale_project_forward(
                x, weight, bias, scale, shift, *config, pw, p_bias, p_scale, p_shift, p_stats, p_eps, *pconf, train,
                [])  # (project_parts: none, the operator slices the weight: ATen copies, not planned)
        if train:
            recorder.flush()
            rec.stage = "backward"
            grad = torch.empty_like(out)
            if project is None:  # as autograd calls it (image pooling: on the 1x1 level)
                block = (args["factor"], args["bins"], args["input_position"])
                grad, op_x = level_backward_inputs(grad, x, level, *block)
                grad_x = ops.multi_scale_backward(grad, op_x, weight, scale, shift, level, pre, mean, var, *config,
                                                  [True, True])[0]
                level_backward_grad_x(grad_x, x, *block)
            else:
                ops.multi_scale_project_backward(grad, x, weight, scale, shift, level, pre, mean, var, *config, pw,
                                                 p_scale, p_shift, p_pre, p_mean, p_var, p_stats, p_eps, *pconf,
                                                 [True, True])
    for lc in rec.launches:
        lc.estimate(dev)
    return Plan(title, dev, rec.launches, kernels="CUDA kernels")


def plan_workload(name: str, mode: str = "inference", dtype: torch.dtype = torch.float32, device: str = "H100",
                  n: Optional[int] = None):
    """The CUDA backend's plan of one call of a WORKLOADS.md workload at its full batch size (or ``n``)."""
    from .triton import plan

    return plan.plan_workload(name, mode, dtype, device, n, planner=plan_block, backend="cuda")


def survey(workloads: Optional[Sequence[str]] = None, modes=("inference", "train"),
           dtypes=(torch.float32, torch.bfloat16), device: str = "H100") -> List[dict]:
    """One summary per (workload, mode, dtype) of the CUDA plan: the launches of the .cu's kernels and of the
    libraries (cuDNN, ATen), each one's count per stage, the fewest blocks of a kernel launch, the estimated
    time and every part of a launch that breaks the fill rule (``msfused.triton.plan.MIN_WAVES``)."""
    from .bench.workloads import WORKLOADS

    def counts(launches) -> dict:
        out: dict = {}
        for lc in launches:
            out.setdefault(lc.stage, {}).setdefault(lc.kernel, 0)
            out[lc.stage][lc.kernel] += 1
        return out

    rows = []
    for name in workloads or list(WORKLOADS):
        for mode in modes:
            for dtype in dtypes:
                p = plan_workload(name, mode, dtype, device)
                kernels = [lc for lc in p.launches if not lc.library]
                library = [lc for lc in p.launches if lc.library]
                rows.append(dict(
                    workload=name, mode=mode, dtype=str(dtype).replace("torch.", ""),
                    kernels=len(kernels), library=len(library), counts=counts(kernels),
                    library_counts=counts(library), min_programs=min(lc.programs for lc in kernels),
                    est_us=p.est_us, max_serial=max(lc.serial for lc in kernels),
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
