"""Compiles every Triton kernel launch of a set of block configurations for real GPUs (sm_80, sm_90),
without a GPU: the launchers run on CPU tensors with the launch itself replaced by a recorder, and
each recorded (kernel, argument types, compile-time constants) is compiled by Triton's CUDA backend to
a cubin (``triton.compile`` with an explicit ``GPUTarget``; ptxas ships with Triton). Catches what
Triton's interpreter lets through and a GPU compiler refuses (types of loop-carried values, constexpr
misuse, unsupported operations). Run by tests/test_triton_compile.py in a process of its own: the
interpreter must be off (TRITON_INTERPRET unset) when the kernels are defined.

    python tests/triton_compile_check.py [--archs 80,90] [--all]

By default (what CI runs) a sample: for the last arch one variant per kernel and operand dtype, chosen to
cover every compile-time constant's values as far as that allows; for the others one variant per kernel.
``--all`` compiles every variant for every arch (an estimated 13 minutes on 2 cores; ``MSFUSED_FULL_COMPILE=1
pytest tests/test_triton_compile.py`` runs it under pytest). Prints one line per compiled variant and exits
non-zero on the first failure.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "run with the Triton interpreter off"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

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


def _record(kernel, grid, *args, **meta):
    configs = [dict(meta)]
    fn = kernel
    if isinstance(kernel, triton.runtime.autotuner.Autotuner):
        # Every autotune configuration for the first variant of each operand dtype, the first one after.
        fn = kernel.fn
        configs = [dict(meta, **c.kwargs) for c in kernel.configs]
        first = (fn.__name__, _arg_type(args[0]))
        if first in _autotuned:
            configs = configs[:1]
        _autotuned.add(first)
    names = fn.arg_names
    for consts in configs:
        signature = {}
        constexprs = {}
        positional = iter(args)
        for i, name in enumerate(names):
            if name in consts:
                signature[name] = "constexpr"
                constexprs[(i,)] = consts[name]
            else:
                signature[name] = _arg_type(next(positional))
        key = (fn.__name__, tuple(signature.items()), tuple(sorted((k[0], v) for k, v in constexprs.items())))
        recorded[key] = (fn, signature, constexprs)


def _configurations():
    """(x, weight, bias, scale, shift, batch_stats, eps, op args) covering every compile-time variant."""
    out = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        for kind in ("ms", "psp"):
            C, cb = 5, (3, 4, 2)
            x = torch.randn(2, C, 13, 11, dtype=dtype)
            if kind == "ms":
                factor, bins, k = [1, 2, 3], [0, 0, 0, 0, 0, 0], [3, 1, 5]
            else:
                factor, bins, k = [0, 0, 0], [1, 1, 2, 3, 6, 6], [1, 1, 3]
            weight = [torch.randn(c, C, kk, kk, dtype=dtype) for c, kk in zip(cb, k)]
            bias = [torch.randn(cb[0], dtype=dtype), None, torch.randn(cb[2], dtype=dtype)]
            sdt = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
            for mode in ("none", "eval", "batch"):
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
    for x, weight, bias, scale, shift, stats, eps, args in _configurations():
        fwd = launch.forward(x, weight, bias, scale, shift, stats, eps, **args)
        out, level, pre, mean, var = fwd
        launch.backward(torch.randn_like(out), x, weight, scale, shift, level, pre, mean, var, stats, eps,
                        **args, output_mask=[True, True])
        if not any(stats):
            launch.inference(x, weight, bias, scale, shift, **args)
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
    for dtype in dtypes:
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


def operand_dtype(signature: dict) -> str:
    """The type of a variant's first floating-point pointer argument (its data's dtype)."""
    return next((t for t in signature.values() if t.startswith(("*fp", "*bf"))), "-")


def _features(key, signature) -> set:
    """What a variant exercises: its kernel with its operand dtype, and each compile-time constant's value."""
    name, _sig, consts = key
    return {(name, "dtype", operand_dtype(signature))} | {(name, i, v) for i, v in consts}


def sample(variants: dict, per_kernel_only: bool = False) -> list:
    """Keys of ``variants`` (recorded order) with one variant per kernel (``per_kernel_only``) or per kernel and
    operand dtype, each picked greedily to add the most compile-time constant values not yet covered."""
    groups = {}
    for key, (_fn, signature, _c) in variants.items():
        group = key[0] if per_kernel_only else (key[0], operand_dtype(signature))
        groups.setdefault(group, []).append(key)
    covered, chosen = set(), []
    for keys in groups.values():
        best = max(keys, key=lambda k: len(_features(k, variants[k][1]) - covered))
        covered |= _features(best, variants[best][1])
        chosen.append(best)
    return chosen


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default="80,90", help="compute capabilities, comma-separated")
    parser.add_argument("--all", action="store_true",
                        help="every variant for every arch (default: one per kernel and operand dtype for the last "
                             "arch, covering the compile-time constants' values; one per kernel for the others)")
    opts = parser.parse_args(argv)
    record_launches()
    record_projection_launches()
    kernels = sorted({key[0] for key in recorded})
    print(f"{len(recorded)} kernel variants recorded ({', '.join(kernels)})", flush=True)
    start = time.time()
    archs = [int(a) for a in opts.archs.split(",")]
    counts = []
    for arch in archs:
        target = GPUTarget("cuda", arch, 32)
        keys = list(recorded) if opts.all else sample(recorded, per_kernel_only=arch != archs[-1])
        counts.append(f"{len(keys)} for sm_{arch}")
        for key in keys:
            name, _sig, consts = key
            fn, signature, constexprs = recorded[key]
            t = time.time()
            try:
                compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=target)
            except Exception as e:  # noqa: BLE001  (report which variant, then fail)
                print(f"FAILED sm_{arch} {name} {dict(consts)}: {type(e).__name__}: {e}", flush=True)
                return 1
            assert "cubin" in compiled.asm, name
            print(f"ok sm_{arch} {name} {operand_dtype(signature)} {dict(consts)} ({time.time() - t:.1f} s)",
                  flush=True)
    print(f"{'all' if opts.all else 'sampled'} variants compiled: {', '.join(counts)} of {len(recorded)} recorded "
          f"({len(kernels)} kernels) in {time.time() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
