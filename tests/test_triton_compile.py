"""Every Triton kernel compiles for real GPUs with Triton's CUDA backend, on this machine without a GPU
(tests/triton_compile_check.py, in a process of its own with the interpreter off), as Triton's launcher
would compile it: the arguments specialised by Triton's binder (divisibility hints of what the launchers
pass), each autotune configuration's num_warps / num_stages; and no variant spills registers for sm_90
(ptxas -v's report). What the interpreter accepts, a GPU compiler may refuse.

CI compiles a sample: for sm_90 one variant per kernel and operand dtype (the projection's epilogue: and per
value of STATS, its partial statistics; ``SAMPLE_EACH``), chosen to cover every compile-time constant's values,
launch options and hints as far as that allows; for sm_80 one variant per kernel (63 compiles of 444 recorded
variants; the projection's kernels also with SPLIT_STEPS lowered, so its split gathers are recorded). The full matrix (every variant for sm_80 and sm_90, an estimated 30 minutes here) is opt-in:

    MSFUSED_FULL_COMPILE=1 pytest tests/test_triton_compile.py    # or: python tests/triton_compile_check.py --all
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

CHECK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "triton_compile_check.py")
FULL = os.environ.get("MSFUSED_FULL_COMPILE", "0") not in ("", "0")
KERNELS = ("block_kernel", "levels_kernel", "pool_kernel", "convs_kernel", "ups_kernel", "stats_combine_kernel",
           "conv_kernel", "up_adjoints_kernel", "column_sums_kernel", "dpres_kernel", "wgrad_kernel", "dx_kernel",
           "project_epilogue_kernel", "gather_kernel", "adjoint_kernel", "act_grad_kernel",
           "norm_grad_kernel")  # the last five: projection.py
DTYPES = ("*fp32", "*fp64", "*fp16", "*bf16")


def _cuda_backend_missing() -> str:
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return f"Triton's CUDA backend is not importable: {type(e).__name__}: {e}"
    return ""


@pytest.mark.slow
@pytest.mark.skipif(bool(_cuda_backend_missing()), reason=_cuda_backend_missing() or "-")
def test_every_triton_kernel_compiles_for_sm80_and_sm90_without_spills(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # really compile, whatever an earlier run cached
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(CHECK)), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, CHECK, "--archs", "80,90"] + (["--all"] if FULL else []), env=env,
                          capture_output=True, text=True, timeout=1800)
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
    assert proc.returncode == 0, tail
    assert ("all" if FULL else "sampled") + " variants compiled" in proc.stdout, tail
    compiled = [line.split()[1:4] for line in proc.stdout.splitlines() if line.startswith("ok ")]
    for arch in ("sm_80", "sm_90"):
        missing = set(KERNELS) - {kernel for a, kernel, _dtype in compiled if a == arch}
        assert not missing, f"never compiled for {arch}: {sorted(missing)}\n{tail}"
    dtypes = {dtype for a, _kernel, dtype in compiled if a == "sm_90"}
    assert dtypes == set(DTYPES), f"operand dtypes compiled for sm_90: {sorted(dtypes)}\n{tail}"
    sm90 = [line for line in proc.stdout.splitlines() if line.startswith(("ok sm_90", "SPILLS sm_90"))]
    assert sm90 and all("bytes spilled" in line for line in sm90), tail  # ptxas -v's report read for each
    assert not any(line.startswith("SPILLS sm_90") for line in sm90), tail


@pytest.mark.slow
@pytest.mark.skipif(bool(_cuda_backend_missing()), reason=_cuda_backend_missing() or "-")
def test_triton_host_cost_tool_runs(tmp_path):
    """bench/triton_host_cost.py (the Triton backend's host time per call, Triton's launch path on a stand-in
    sm_90 driver) still runs against this Triton: both modes report their launches and times."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    tool = os.path.join(os.path.dirname(os.path.dirname(CHECK)), "bench", "triton_host_cost.py")
    proc = subprocess.run([sys.executable, tool, "psp_small"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["psp_small N=1 bfloat16 inference",
                                                      "psp_small N=1 bfloat16 training step"], proc.stdout
    assert "2 Triton launches" in lines[0] and " 0 Triton launches" not in lines[1], proc.stdout
