"""The CMake build for libtorch users (CMakeLists.txt, examples/cpp/).

Configures and builds libmsfused.so and the C++ example into a temporary folder, then
  * loads the library into a fresh Python process with torch.ops.load_library and checks the operator
    (forward and the C++ autograd kernel) against plain torch.nn.functional. A separate process because
    msfused._C registers the same TORCH_LIBRARY(msfused): the two cannot share a process (it aborts);
  * runs the example program, which checks itself and exits non-zero on failure;
  * installs the project and checks the installed files.

With a CUDA build of torch and nvcc the library is built with -DMSFUSED_WITH_CUDA=ON, and where torch
sees a GPU the operator check and the example run on it as well. The build (Debug, C++ at -O0) takes under
a minute on two cores (MAX_JOBS sets the parallelism, default 2); MSFUSED_CMAKE_ARGS adds configure arguments (e.g. a
-DCUDA_nvrtc_LIBRARY=... where the CUDA toolkit lacks a library torch's CMake package wants).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CMAKE = shutil.which("cmake")
NVCC = shutil.which("nvcc")
WITH_CUDA = torch.version.cuda is not None and NVCC is not None
ON_GPU = WITH_CUDA and torch.cuda.is_available()

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CMAKE is None, reason="cmake is not installed (pip install cmake), cannot test the CMake build"),
]


def _run(cmd, timeout, **kwargs) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kwargs)
    if r.returncode != 0:
        pytest.fail(
            f"{' '.join(map(str, cmd))} exited with {r.returncode}\n"
            f"--- stdout (tail) ---\n{r.stdout[-6000:]}\n--- stderr (tail) ---\n{r.stderr[-6000:]}"
        )
    return r


def _cuda_args() -> list:
    """-DMSFUSED_WITH_CUDA=ON and where the toolkit is, as nvcc itself reports it: nvcc on PATH may be a
    wrapper script outside the toolkit, where CMake's and torch's CUDA lookups would not find it."""
    r = subprocess.run([NVCC, "--dryrun", "-x", "cu", "-c", "/dev/null", "-o", "/dev/null"],
                       capture_output=True, text=True, timeout=60)
    m = re.search(r"^#\$ TOP=(.+)$", r.stdout + r.stderr, re.M)
    args = ["-DMSFUSED_WITH_CUDA=ON"]
    if m:
        top = Path(m.group(1).strip()).resolve()
        args += [f"-DCMAKE_CUDA_COMPILER={top / 'bin' / 'nvcc'}", f"-DCUDAToolkit_ROOT={top}",
                 f"-DCUDA_TOOLKIT_ROOT_DIR={top}"]  # the latter for torch's own (FindCUDA) lookup
    return args


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory) -> Path:
    build = tmp_path_factory.mktemp("cmake-build")
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    _run(
        # Unoptimised C++ (a third of -O3's compile time): these checks are of the CMake project, the library's
        # loading and its results on small inputs; the rest of the suite runs setup.py's -O3 build.
        [CMAKE, "-S", ROOT, "-B", build, *generator, "-DCMAKE_BUILD_TYPE=Debug", "-DCMAKE_CXX_FLAGS_DEBUG=-O0",
         "-DMSFUSED_BUILD_EXAMPLES=ON",
         f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}", *(_cuda_args() if WITH_CUDA else []),
         *shlex.split(os.environ.get("MSFUSED_CMAKE_ARGS", ""))],
        timeout=300,
    )
    _run([CMAKE, "--build", build, "--parallel", os.environ.get("MAX_JOBS", "2")], timeout=1800)
    return build


def _library(build: Path) -> Path:
    lib = build / "libmsfused.so"
    assert lib.exists(), f"the build made no {lib.name}: {sorted(p.name for p in build.iterdir())}"
    return lib


# Runs in a fresh interpreter, without msfused: argv[1] is the library.
_CHECK_OPERATOR = textwrap.dedent(
    """
    import sys
    import torch
    import torch.nn.functional as F

    torch.ops.load_library(sys.argv[1])
    assert "msfused" not in sys.modules, "this check must not import msfused (it registers the same library)"
    op = torch.ops.msfused.multi_scale_forward
    device = torch.device(sys.argv[2])
    assert torch._C._dispatch_has_kernel_for_dispatch_key(
        "msfused::multi_scale_forward", "CUDA" if device.type == "cuda" else "CPU"), f"no {device.type} kernel"
    torch.manual_seed(0)
    f64 = dict(dtype=torch.float64, device=device)


    def check(name, got, ref, scale=None):
        # SPEC.md's norm-wise error; gradients are measured against the upstream gradient's norm too.
        denom = max(ref.norm().item(), 1e-6 * (ref.norm().item() if scale is None else scale))
        err = (got - ref).norm().item() / denom
        assert got.shape == ref.shape and err <= 1e-10, f"{name}: shape {tuple(got.shape)}, error {err:.3g}"


    # 1. PSPNet pyramid pooling: bins 1, 2, 3, 6, 1x1 convs, eval-mode BatchNorm folded into scale/shift,
    #    relu, bilinear upsampling, x first. Bins need not divide 11x13.
    N, C, H, W, Cb = 2, 8, 11, 13, 2
    x = torch.randn(N, C, H, W, **f64)
    bins = [1, 2, 3, 6]
    w = [torch.randn(Cb, C, 1, 1, **f64) for _ in bins]
    scale = [torch.rand(Cb, **f64) + 0.5 for _ in bins]
    shift = [torch.randn(Cb, **f64) for _ in bins]
    out = op(x, w, [None] * 4, scale, shift, [False] * 4, [1e-5] * 4, [0] * 4, [v for b in bins for v in (b, b)],
             "avg", "bilinear", False, "relu", "first")[0]
    ref = [x]
    for b, wb, s, t in zip(bins, w, scale, shift):
        z = F.conv2d(F.adaptive_avg_pool2d(x, b), wb) * s[:, None, None] + t[:, None, None]
        ref.append(F.interpolate(F.relu(z), size=(H, W), mode="bilinear", align_corners=False))
    check("pyramid pooling output", out, torch.cat(ref, 1))

    # 2. A factor pyramid (1, 2, 4) with 3x3 convs and bias, training-mode BatchNorm (batch statistics),
    #    silu, bilinear down and up with align_corners, x last; forward and backward (the C++ autograd kernel).
    N, C, H, W, Cb = 2, 4, 16, 12, 3
    factors = [1, 2, 4]

    def params():
        torch.manual_seed(1)
        x = torch.randn(N, C, H, W, **f64, requires_grad=True)
        mk = lambda *shape: torch.randn(*shape, **f64).requires_grad_()
        return x, [mk(Cb, C, 3, 3) for _ in factors], [mk(Cb) for _ in factors], \\
            [mk(Cb) for _ in factors], [mk(Cb) for _ in factors]

    x, w, bias, gamma, beta = params()
    out, level, pre, mean, var = op(x, w, bias, gamma, beta, [True] * 3, [1e-5] * 3, factors, [0] * 6,
                                    "bilinear", "bilinear", True, "silu", "last")
    g = torch.randn_like(out)
    out.backward(g)
    fused_grads = [x.grad] + [t.grad for ts in (w, bias, gamma, beta) for t in ts]

    x, w, bias, gamma, beta = params()
    ref, stats = [], []
    for s, wb, bb, gm, bt in zip(factors, w, bias, gamma, beta):
        z = x if s == 1 else F.interpolate(x, size=(H // s, W // s), mode="bilinear", align_corners=True)
        c = F.conv2d(z, wb, bb, padding=1)
        stats.append((c.mean((0, 2, 3)), c.var((0, 2, 3), unbiased=False)))
        a = F.silu(F.batch_norm(c, None, None, gm, bt, training=True, eps=1e-5))
        ref.append(a if s == 1 else F.interpolate(a, size=(H, W), mode="bilinear", align_corners=True))
    ref = torch.cat(ref + [x], 1)
    ref.backward(g)
    check("factor pyramid output", out, ref.detach())
    for i, (m, v) in enumerate(stats):
        check(f"batch mean[{i}]", mean[i], m.detach())
        check(f"batch var[{i}]", var[i], v.detach())
    ref_grads = [x.grad] + [t.grad for ts in (w, bias, gamma, beta) for t in ts]
    for i, (got, want) in enumerate(zip(fused_grads, ref_grads)):
        check(f"gradient {i}", got, want, scale=g.norm().item())
    print("OK")
    """
)


DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not ON_GPU, reason="needs a CUDA torch, nvcc and a GPU")),
]


@pytest.mark.parametrize("device", DEVICES)
def test_library_loads_and_matches_functional(build_dir, tmp_path, device):
    lib = _library(build_dir)
    assert b"PyInit__C" not in lib.read_bytes(), "python_module.cpp must not be part of the CMake library"
    r = _run([sys.executable, "-c", _CHECK_OPERATOR, lib, device], timeout=300, cwd=tmp_path)
    assert r.stdout.strip().endswith("OK"), r.stdout + r.stderr


@pytest.mark.parametrize("device", DEVICES)
def test_example_runs(build_dir, device):
    exe = build_dir / "examples" / "cpp" / "multi_scale_example"
    assert exe.exists(), f"the example was not built: {exe}"
    r = _run([exe, "--device", device], timeout=300, cwd=build_dir)
    assert f"device: {device}" in r.stdout, r.stdout + r.stderr
    assert "output shape: [2, 16, 12, 12]" in r.stdout and r.stdout.strip().endswith("OK"), r.stdout + r.stderr


def test_example_picks_the_gpu_by_default(build_dir):
    """Without --device the example runs where the fused CUDA kernels can: on the GPU when there is one
    and the library was built with them, else on the CPU."""
    exe = build_dir / "examples" / "cpp" / "multi_scale_example"
    r = _run([exe], timeout=300, cwd=build_dir)
    assert f"device: {'cuda' if ON_GPU else 'cpu'}" in r.stdout, r.stdout + r.stderr


def test_install(build_dir, tmp_path):
    prefix = tmp_path / "prefix"
    _run([CMAKE, "--install", build_dir, "--prefix", prefix], timeout=300)
    libs = [p for d in ("lib", "lib64") for p in (prefix / d).glob("libmsfused.so*")]
    assert libs, f"no libmsfused.so installed under {prefix}"
    for header in sorted((ROOT / "csrc").glob("*.h")):
        assert (prefix / "include" / "msfused" / header.name).exists(), f"{header.name} not installed"
    assert list(prefix.glob("lib*/cmake/msfused/msfusedConfig.cmake")), "no CMake package config installed"
