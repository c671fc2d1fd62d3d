"""``python -m msfused info`` (the build and each backend), ``python -m msfused bench`` (the workloads) and
``python -m msfused explain`` (a workload's launch plan, estimated without a GPU).

Run from a clone after ``pip install .``, ``python -m msfused`` first imports the clone's ``msfused/``
folder, which has no compiled extension; it then runs the installed msfused instead, and says so
(:func:`_run_installed`).
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import List, Optional

# Set in the process that runs the installed msfused: the source tree taken out of its sys.path.
_SHADOWED_TREE = "MSFUSED_SHADOWED_TREE"
_RUN_INSTALLED = (
    "import os, runpy, sys; tree = os.path.realpath(os.environ['MSFUSED_SHADOWED_TREE']); "
    "sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) != tree]; "
    "runpy.run_module('msfused', run_name='__main__', alter_sys=True)"
)


def _run_installed(argv: List[str]) -> Optional[int]:
    """When the imported msfused is a source tree without its extension that shadows an installed
    msfused with one, runs ``python -m msfused argv`` with the installed one (the tree's parent folder
    left out of ``sys.path``) and returns its exit status; None when there is nothing to do."""
    from msfused import _ops

    if _ops.loaded() or os.environ.get(_SHADOWED_TREE) or os.environ.get("MSFUSED_NO_EXTENSION", "0") not in ("", "0"):
        return None  # loaded, already the installed one, or left unloaded on purpose
    installed = _ops.shadowed_install()
    if installed is None:
        return None
    tree = os.path.dirname(os.path.abspath(_ops.__file__))
    print(f"python -m msfused: {tree} is a source tree without its compiled extension (msfused._C): running "
          f"the installed msfused in {installed} instead (to run this tree, build it in place: "
          "python setup.py build_ext --inplace)", file=sys.stderr, flush=True)
    env = dict(os.environ, **{_SHADOWED_TREE: os.path.dirname(tree)})
    return subprocess.call([sys.executable, "-c", _RUN_INSTALLED, *argv], env=env)


def _cuda_build(build: dict) -> str:
    if not build.get("cuda"):
        return "no"
    return f"yes (CUDA {build['cuda']}, archs {build.get('cuda_arch_list')})"


def _cpu_paths() -> str:
    """The CPU code paths this machine gets, from the extension (csrc/python_module.cpp)."""
    import torch

    from msfused import _C

    paths = _C.cpu_paths()
    onednn = torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled

    def half(dtype: str) -> str:
        if paths[f"{dtype}_ukernel"] and onednn:
            return f"{dtype} on oneDNN's micro-kernel"
        why = "torch.backends.mkldnn off" if paths[f"{dtype}_ukernel"] else "no micro-kernel for it here"
        return f"{dtype} as a float32 convolution of the widened operands ({why})"

    return (f"SIMD clone {paths['simd']}; the projection's half-precision parts: {half('bfloat16')}, "
            f"{half('float16')}")


def info() -> int:
    import torch

    import msfused
    from msfused import _ops, backends

    build = _ops.build_info()
    print(f"msfused {msfused.__version__} ({os.path.dirname(os.path.abspath(msfused.__file__))})")
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), CUDA devices: {torch.cuda.device_count()}")
    if _ops.loaded():
        print(
            f"extension msfused._C: loaded, built against torch {build.get('torch', '?')}, "
            f"CUDA kernels: {_cuda_build(build)}"
        )
        print(f"CPU kernels: {_cpu_paths()}")
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
    if command in ("info", "bench", "explain"):
        status = _run_installed(argv)
        if status is not None:
            return status
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
