"""Every Triton kernel variant the launchers use compiles for sm_90 (and one variant of each kernel and
operand dtype for sm_80) with Triton's CUDA backend, on this machine without a GPU (tests/triton_compile_check.py, in a process of its own with
the interpreter off): what the interpreter accepts, a GPU compiler may refuse."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

CHECK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "triton_compile_check.py")


def _cuda_backend_missing() -> str:
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return f"Triton's CUDA backend is not importable: {e}"
    return ""


@pytest.mark.slow
@pytest.mark.skipif(bool(_cuda_backend_missing()), reason=_cuda_backend_missing() or "-")
def test_every_triton_kernel_compiles_for_sm80_and_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # really compile, whatever an earlier run cached
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(CHECK)), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, CHECK, "--archs", "80,90"], env=env, capture_output=True, text=True,
                          timeout=1800)
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
    assert proc.returncode == 0, tail
    assert "variants compiled for sm_80, sm_90" in proc.stdout, tail
    compiled = {line.split()[2] for line in proc.stdout.splitlines() if line.startswith("ok ")}
    for kernel in ("block_kernel", "levels_kernel", "convs_kernel", "ups_kernel", "stats_combine_kernel",
                   "conv_kernel", "up_adjoints_kernel", "column_sums_kernel", "dpres_kernel", "wgrad_kernel",
                   "dx_kernel"):
        assert kernel in compiled, f"{kernel} was never compiled:\n{tail}"
