"""``python -m msfused info`` (the build and each backend), ``python -m msfused bench`` (the workloads) and
``python -m msfused explain`` (a workload's launch plan, estimated without a GPU)."""

from __future__ import annotations

import sys


def _cuda_build(build: dict) -> str:
    if not build.get("cuda"):
        return "no"
    return f"yes (CUDA {build['cuda']}, archs {build.get('cuda_arch_list')})"


def info() -> int:
    import torch

    import msfused
    from msfused import _ops, backends

    build = _ops.build_info()
    print(f"msfused {msfused.__version__}")
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), CUDA devices: {torch.cuda.device_count()}")
    if _ops.loaded():
        print(
            f"extension msfused._C: loaded, built against torch {build.get('torch', '?')}, "
            f"CUDA kernels: {_cuda_build(build)}"
        )
    else:
        print(f"extension msfused._C: not loaded: {_ops.load_error()}")
    try:
        import triton

        from msfused.triton import interpreting

        mode = " (interpreter: TRITON_INTERPRET=1, CPU tensors)" if interpreting() else ""
        print(f"triton: {triton.__version__}{mode}")
    except ImportError:
        print("triton: not installed")
    print("backends:")
    for name in backends.BACKENDS:
        ok, why = backends.availability(name)
        print(f"  {name:<10} {'available' if ok else 'unavailable: ' + why}")
    print(f"requested backend: {backends.requested_backend()} (use_backend / {backends.ENV_VAR} / 'auto')")
    from msfused import autotune

    # 'auto''s measured choices: this process's (none yet), or the table MSFUSED_AUTOTUNE_FILE names
    print(autotune.report())
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m msfused {info,bench,explain} [options]\n"
              "  info     the build (torch, CUDA) and each backend, with why one is unavailable\n"
              "  bench    fused against naive (and torch.compile) on the workloads; bench --help for options\n"
              "  explain  a workload's kernel launches, estimated without a GPU; explain --help for options")
        return 0
    command, rest = argv[0], argv[1:]
    if command == "info":
        return info()
    if command == "bench":
        from msfused.bench.cli import main as bench_main

        return bench_main(rest)
    if command == "explain":
        from msfused.triton.plan import main as explain_main

        return explain_main(rest)
    print(f"python -m msfused: unknown command {command!r} (use info, bench or explain)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
