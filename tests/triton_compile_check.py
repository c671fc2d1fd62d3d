"""Compiles every Triton kernel launch of a set of block configurations for real GPUs (sm_80, sm_90),
without a GPU: the launchers run on CPU tensors with the launch itself replaced by a recorder, and
each recorded launch is compiled by Triton's CUDA backend to a cubin (``triton.compile`` with an explicit
``GPUTarget``; ptxas ships with Triton) exactly as Triton's launcher would compile it: the arguments bound
and specialised by Triton's own binder (argument types, the 16-divisibility and alignment hints of the
integers and pointers the launcher passes, integers equal to 1), the compile-time constants, and
``num_warps`` / ``num_stages`` / ``maxnreg`` of every configuration of an autotuned kernel's (production)
list.
Catches what Triton's interpreter lets through and a GPU compiler refuses (types of loop-carried
values, constexpr misuse, unsupported operations), and reads ``ptxas -v``'s report (Triton's
``dump_ptxas_log`` knob; Triton fills ``n_spills`` only when a kernel is loaded on a device): a variant
that spills registers for sm_90 fails the check (spills for sm_80 are reported). Run by
tests/test_triton_compile.py in a process of its own: the interpreter must be off (TRITON_INTERPRET
unset) when the kernels are defined.

    python tests/triton_compile_check.py [--archs 80,90] [--all] [--kernels block_kernel,...]

By default (what CI runs) a sample: for the last arch one variant per kernel and operand dtype, chosen to
cover every compile-time constant's value, launch option and specialisation as far as that allows; for the
others one variant per kernel. ``--all`` compiles every variant for every arch (``MSFUSED_FULL_COMPILE=1
pytest tests/test_triton_compile.py`` runs it under pytest). Prints one line per compiled variant (registers,
spilled bytes) and exits non-zero after a variant that fails to compile or spills for sm_90.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shutil
import sys
import tempfile
import time

assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "run with the Triton interpreter off"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from msfused.triton import launch  # noqa: E402

_PTR = {torch.float32: "*fp32", torch.float64: "*fp64", torch.float16: "*fp16", torch.bfloat16: "*bf16",
        torch.int32: "*i32", torch.int64: "*i64"}


def _arg_type(value) -> str:
    if isinstance(value, torch.Tensor):
        return _PTR[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"unexpected kernel argument {value!r}")


recorded = {}
_autotuned = set()
_binders = {}
# Specialisation as Triton's launcher computes it (the same for every NVIDIA arch): with this backend's rules.
_BACKEND = make_backend(GPUTarget("cuda", 90, 32))


def _bind(fn, args, kwargs):
    """(signature, constexprs, attrs) of launching ``fn`` with these arguments, from Triton's own binder:
    argument types, compile-time constants, and the divisibility / alignment hints of the values passed."""
    binder = _binders.get(fn)
    if binder is None:
        binder = _binders[fn] = create_function_from_signature(fn.signature, fn.params, _BACKEND)
    bound, specialization, options = binder(*args, **kwargs)
    _options, signature, constexprs, attrs = fn._pack_args(_BACKEND, kwargs, bound, specialization, options)
    return signature, constexprs, attrs


def _record(kernel, grid, *args, **meta):
    configs = [dict(meta)]
    fn = kernel
    if isinstance(kernel, triton.runtime.autotuner.Autotuner):
        # Every autotune configuration (its launch options too) for the first variant of each operand dtype,
        # the first one after.
        fn = kernel.fn
        configs = [dict(meta, **c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages,
                        **({"maxnreg": c.maxnreg} if c.maxnreg is not None else {})) for c in kernel.configs]
        first = (fn.__name__, _arg_type(args[0]))
        if first in _autotuned:
            configs = configs[:1]
        _autotuned.add(first)
    for kwargs in configs:
        signature, constexprs, attrs = _bind(fn, args, kwargs)
        launch_options = {k: kwargs[k] for k in ("num_warps", "num_stages", "maxnreg") if k in kwargs}
        consts = tuple(sorted((k[0], v) for k, v in constexprs.items()))
        hints = tuple(sorted((k[0], str(v)) for k, v in attrs.items()))
        key = (fn.__name__, tuple(signature.items()), consts, hints, tuple(sorted(launch_options.items())))
        recorded[key] = (fn, signature, constexprs, attrs, launch_options)


def _configurations():
    """(x, weight, bias, scale, shift, batch_stats, eps, op args) covering every compile-time variant: odd sizes
    (no divisibility hints), and sizes of 16 channels and 16 x 16 maps as the workloads have them (integers and
    pointers 16-divisible: Triton's launcher passes the hints and the compiler vectorises)."""
    out = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        for kind, aligned in (("ms", False), ("psp", False), ("ms", True), ("psp", True)):
            C, cb, hw = (16, (16, 32, 16), (16, 16)) if aligned else (5, (3, 4, 2), (13, 11))
            x = torch.randn(2, C, *hw, dtype=dtype)
            if kind == "ms":
                factor, bins, k = [1, 2, 3], [0, 0, 0, 0, 0, 0], [3, 1, 5]
                if aligned:
                    factor, k = [1, 2, 4], [3, 3, 1]
            else:
                factor, bins, k = [0, 0, 0], [1, 1, 2, 3, 6, 6], [1, 1, 3]
            weight = [torch.randn(c, C, kk, kk, dtype=dtype) for c, kk in zip(cb, k)]
            bias = [torch.randn(cb[0], dtype=dtype), None, torch.randn(cb[2], dtype=dtype)]
            sdt = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
            for mode in ("eval", "batch") if aligned else ("none", "eval", "batch"):
                if mode == "none":
                    scale = shift = [None] * 3
                else:
                    scale = [torch.rand(c, dtype=sdt) + 0.5 for c in cb]
                    shift = [torch.randn(c, dtype=sdt) for c in cb]
                    if mode == "batch":  # affine parameters in the parameters' dtype; one norm without them
                        scale = [s.to(dtype) for s in scale[:2]] + [None]
                        shift = [s.to(dtype) for s in shift[:2]] + [None]
                stats = [mode == "batch"] * 3
                act = {"none": "relu", "eval": "gelu", "batch": "silu"}[mode]
                pos = {"none": "first", "eval": "last", "batch": "none"}[mode]
                args = dict(factor=factor, bins=bins, down_mode="bilinear", up_mode="bilinear", align_corners=False,
                            activation=act, input_position=pos)
                out.append((x, weight, bias, scale, shift, stats, [1e-5] * 3, args))
    return out


def record_launches() -> None:
    launch._launch = _record  # record instead of launching
    ieee = launch._dot_mode
    for x, weight, bias, scale, shift, stats, eps, args in _configurations():
        # float32 on a GPU multiplies with TF32 where cuDNN would (torch.backends.cudnn.allow_tf32, on by
        # default), IEEE otherwise (what CPU tensors get): the workload-sized float32 blocks record both
        tf32 = x.dtype == torch.float32 and x.shape[1] % 16 == 0
        for dot_mode in [ieee] + ([lambda _x: launch.K.DOT_TF32] if tf32 else []):
            launch._dot_mode = dot_mode
            fwd = launch.forward(x, weight, bias, scale, shift, stats, eps, **args)
            out, level, pre, mean, var = fwd
            launch.backward(torch.randn_like(out), x, weight, scale, shift, level, pre, mean, var, stats, eps,
                            **args, output_mask=[True, True])
            if not any(stats):
                launch.inference(x, weight, bias, scale, shift, **args)
                split, launch.SPLIT_OUTPUTS = launch.SPLIT_OUTPUTS, 1  # and as a large block's: the forward's
                launch.inference(x, weight, bias, scale, shift, **args)
                launch.SPLIT_OUTPUTS = split
        launch._dot_mode = ieee
    # more than four branches: the dx kernel's chunks
    x = torch.randn(1, 2, 9, 9)
    weight = [torch.randn(1, 2, 1, 1) for _ in range(5)]
    args = dict(factor=[1, 2, 3, 4, 2], bins=[0] * 10, down_mode="avg", up_mode="nearest", align_corners=False,
                activation="none", input_position="none")
    none = [None] * 5
    out, level, pre, mean, var = launch.forward(x, weight, none, none, none, [False] * 5, [0.0] * 5, **args)
    launch.backward(torch.randn_like(out), x, weight, none, none, level, pre, mean, var, [False] * 5, [0.0] * 5,
                    **args, output_mask=[True, False])
    launch.inference(x, weight, none, none, none, **args)


def record_projection_launches(dtypes=(torch.float32, torch.bfloat16)) -> None:
    """The projection's kernels (msfused/triton/projection.py), forward and backward: k 1 and 3, per-tap and
    direct parts, its norm folded and with batch statistics (more dtypes: more variants of the same code)."""
    from msfused.triton import projection

    launch._launch = _record
    default_split, default_adjoint = launch.SPLIT_STEPS, launch.ADJOINT_STEPS
    # and with SPLIT_STEPS / ADJOINT_STEPS lowered: the levels' pooling windows and the backward's adjoint
    # gathers in chunks
    for dtype, split in [(d, default_split) for d in dtypes] + [(dtypes[0], 8)]:
        launch.SPLIT_STEPS = split
        launch.ADJOINT_STEPS = default_adjoint if split == default_split else 1
        sdt = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        x = torch.randn(2, 3, 9, 8, dtype=dtype)
        weight = [torch.randn(2, 3, 1, 1, dtype=dtype) for _ in range(3)]
        none = [None] * 3
        args = dict(factor=[1, 0, 0], bins=[0, 0, 1, 1, 2, 3], down_mode="avg", up_mode="bilinear",
                    align_corners=False, activation="relu", input_position="first")
        for k, stats in ((3, False), (1, True)):
            pw = torch.randn(4, 9, k, k, dtype=dtype)
            ps, pt = torch.rand(4, dtype=sdt) + 0.5, torch.randn(4, dtype=sdt)
            fwd = projection.project_forward(x, weight, none, none, none, [False] * 3, [1e-5] * 3, **args,
                                             pw=pw, p_bias=torch.randn(4, dtype=dtype), p_scale=ps, p_shift=pt,
                                             p_batch_stats=stats, p_eps=1e-5, p_activation="gelu", save_pre=True)
            out, level, pre, mean, var, p_pre, p_mean, p_var = fwd
            projection.project_backward(torch.randn_like(out), x, weight, none, none, level, pre, mean, var,
                                        [False] * 3, [1e-5] * 3, **args, pw=pw, p_scale=ps, p_shift=pt, p_pre=p_pre,
                                        p_mean=p_mean, p_var=p_var, p_batch_stats=stats, p_eps=1e-5,
                                        p_activation="gelu", output_mask=[True, True])
    launch.SPLIT_STEPS, launch.ADJOINT_STEPS = default_split, default_adjoint
    # more parts than one accumulation launch adds (MAX_PARTS): in half precision the sum between launches in a
    # float32 buffer (pointers of two dtypes in one launch)
    half = dtypes[-1]
    x = torch.randn(2, 3, 9, 8, dtype=half)
    B = projection.MAX_PARTS + 1
    projection.project_forward(x, [torch.randn(2, 3, 1, 1, dtype=half) for _ in range(B)], *[[None] * B] * 3,
                               [False] * B, [1e-5] * B, factor=[1] * B, bins=[0, 0] * B, down_mode="avg",
                               up_mode="bilinear", align_corners=False, activation="relu", input_position="first",
                               pw=torch.randn(4, 3 + 2 * B, 3, 3, dtype=half), p_bias=None, p_scale=None,
                               p_shift=None, p_batch_stats=False, p_eps=1e-5, p_activation="relu", save_pre=False)


def operand_dtype(signature: dict) -> str:
    """The type of a variant's first floating-point pointer argument (its data's dtype)."""
    return next((t for t in signature.values() if t.startswith(("*fp", "*bf"))), "-")


def _features(key, signature) -> set:
    """What a variant exercises: its kernel with its operand dtype, each compile-time constant's value, its
    launch options, and whether its integers and pointers carry divisibility hints."""
    name, _sig, consts, hints, launch_options = key
    return ({(name, "dtype", operand_dtype(signature)), (name, "hints", len(hints) > 0)}
            | {(name, i, v) for i, v in consts} | {(name, k, v) for k, v in launch_options})


#: Compile-time constants whose every value gets variants of its own in the per-dtype sample: the code they
#: switch on is large enough to change register use (the projection's epilogue with its partial statistics).
SAMPLE_EACH = {"project_epilogue_kernel": ("STATS",)}


def sample(variants: dict, per_kernel_only: bool = False) -> list:
    """Keys of ``variants`` (recorded order) with one variant per kernel (``per_kernel_only``) or per kernel and
    operand dtype (and value of each of its ``SAMPLE_EACH`` constants), each picked greedily to add the most
    compile-time constant values not yet covered."""
    groups = {}
    for key, (fn, signature, *_rest) in variants.items():
        group = key[0] if per_kernel_only else (key[0], operand_dtype(signature))
        if not per_kernel_only:
            consts = dict(key[2])
            group += tuple(consts.get(fn.arg_names.index(c)) for c in SAMPLE_EACH.get(key[0], ()))
        groups.setdefault(group, []).append(key)
    covered, chosen = set(), []
    for keys in groups.values():
        best = max(keys, key=lambda k: len(_features(k, variants[k][1]) - covered))
        covered |= _features(best, variants[best][1])
        chosen.append(best)
    return chosen


# (Triton 3.9 names the tool in its report: "ptxas-blackwell info", also for sm_90)
_PTXAS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads\s+"
                    r"ptxas(?:-[\w-]+)? info\s+: Used (\d+) registers")


def compile_variant(variant, arch: int):
    """Compiles one recorded variant for ``arch``; returns (registers, spill stores, spill loads) from ptxas -v."""
    fn, signature, constexprs, attrs, launch_options = variant
    target = GPUTarget("cuda", arch, 32)
    options = make_backend(target).parse_options(dict(launch_options))
    log = io.StringIO()
    triton.knobs.nvidia.dump_ptxas_log = True
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                                      target=target, options=options.__dict__)
    finally:
        triton.knobs.nvidia.dump_ptxas_log = False
    assert "cubin" in compiled.asm, fn.__name__
    found = _PTXAS.search(log.getvalue())
    assert found, f"no ptxas -v report for {fn.__name__}: {log.getvalue()[-2000:]}"
    stores, loads, registers = (int(v) for v in found.groups())
    return registers, stores, loads


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default="80,90", help="compute capabilities, comma-separated")
    parser.add_argument("--all", action="store_true",
                        help="every variant for every arch (default: one per kernel and operand dtype for the last "
                             "arch, covering the compile-time constants' values; one per kernel for the others)")
    parser.add_argument("--kernels", default="", help="only these kernels (comma-separated names)")
    opts = parser.parse_args(argv)
    record_launches()
    record_projection_launches()
    if opts.kernels:
        for key in [k for k in recorded if k[0] not in opts.kernels.split(",")]:
            del recorded[key]
    kernels = sorted({key[0] for key in recorded})
    print(f"{len(recorded)} kernel variants recorded ({', '.join(kernels)})", flush=True)
    start = time.time()
    archs = [int(a) for a in opts.archs.split(",")]
    counts, spilled = [], []
    cache = tempfile.mkdtemp(prefix="msfused-triton-cache-")
    triton.knobs.cache.dir = cache  # compile for real (ptxas runs, and reports), whatever an earlier run cached
    try:
        for arch in archs:
            keys = list(recorded) if opts.all else sample(recorded, per_kernel_only=arch != archs[-1])
            counts.append(f"{len(keys)} for sm_{arch}")
            for key in keys:
                name, _sig, consts, hints, launch_options = key
                what = f"sm_{arch} {name} {operand_dtype(recorded[key][1])} {dict(consts)} {dict(launch_options)}"
                t = time.time()
                try:
                    registers, stores, loads = compile_variant(recorded[key], arch)
                except Exception as e:  # noqa: BLE001  (report which variant, then fail)
                    print(f"FAILED {what}: {type(e).__name__}: {e}", flush=True)
                    return 1
                report = f"{registers} registers, {stores} + {loads} bytes spilled"
                if stores or loads:
                    spilled.append((arch, what, report))
                print(f"{'ok' if not (stores or loads) else 'SPILLS'} {what} {len(hints)} hints: {report} "
                      f"({time.time() - t:.1f} s)", flush=True)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    print(f"{'all' if opts.all else 'sampled'} variants compiled: {', '.join(counts)} of {len(recorded)} recorded "
          f"({len(kernels)} kernels) in {time.time() - start:.0f} s; {len(spilled)} spill", flush=True)
    failing = [s for s in spilled if s[0] >= 90]
    for arch, what, report in spilled:
        print(f"{'FAILED' if arch >= 90 else 'note'}: register spills for {what}: {report}", flush=True)
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())
