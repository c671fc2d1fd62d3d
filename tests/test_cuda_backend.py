"""Backend 'cuda' (csrc/cuda/) on a GPU: the fused modules against their naive twins run in float64 on the
CPU (tests/conftest.py's comparison, with the fused module and its input on CUDA) over the factor and bins
grids of test_forward_backward.py, channels_last and odd shapes, float64 / float32 (TF32 off) / float16 /
bfloat16 (SPEC.md: err no larger than twice the naive composition's own in that dtype, plus 1e-3), bit-identical
gradients run to run, and empty inputs.

Skipped without a CUDA device. Without one, test_cuda_build.py (nvcc, ptxas: no spills) and
test_cuda_emulation.py (the same kernels run on the CPU against the CPU kernels) check the kernels.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import msfused
from msfused import _ops

from .conftest import Case, build_case, case_ids, check_half_precision_grads, make_input, run_case
from .test_forward_backward import _bins_grid, _mode_grid

# One skip for the module (not one per case) where its tests cannot run.
if not torch.cuda.is_available():
    pytest.skip("no CUDA device: the CUDA backend runs on a GPU only (test_cuda_build.py and test_cuda_emulation.py "
                "check its kernels without one)", allow_module_level=True)
if not _ops.has_kernel("CUDA"):
    pytest.skip("msfused._C was built without the CUDA kernels", allow_module_level=True)


@pytest.fixture(autouse=True)
def _cuda_backend():
    """Backend 'cuda' for the fused module; TF32 off (SPEC.md's float32 rule)."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with msfused.use_backend("cuda"):
            yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


# ---------------------------------------------------------------------------------------------------
# The factor and bins grids of test_forward_backward.py (float64 and float32), on CUDA
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", _mode_grid(), ids=case_ids(_mode_grid()))
def test_factor_modes_cuda(case):
    run_case(case, device="cuda")


@pytest.mark.parametrize("case", _bins_grid(), ids=case_ids(_bins_grid()))
def test_bins_cuda(case):
    run_case(case, device="cuda")


def _layout_cases():
    cases = []
    configs = (
        ("ms", dict(scales=(1, 2, 4), kernel_size=3, norm="batch"), (2, 5, 37, 29)),  # several tiles, odd sizes
        ("ms", dict(scales=(1, 3), down_mode="bilinear", align_corners=True, kernel_size=5, activation="gelu",
                    branch_channels=11), (3, 9, 23, 31)),  # > 8 output and input channels: chunks
        ("ms", dict(scales=(2,), kernel_size=7, down_mode="nearest", up_mode="nearest", input_position=None),
         (2, 3, 30, 17)),
        ("psp", dict(bins=(1, 2, 3, 6), kernel_size=1, bias=True), (2, 10, 33, 18)),
        ("psp", dict(bins=(48, 2), kernel_size=3, up_mode="nearest"), (2, 3, 48, 48)),  # too big for the pool kernel
    )
    for (kind, kwargs, shape), layout, dtype, train in itertools.product(
            configs, ("contiguous", "channels_last", "slice_h", "channels_last_slice"),
            (torch.float64, torch.float32), (False, True)):
        cases.append(Case(kind, kwargs, shape, dtype, layout=layout, train=train, steps=2 if train else 1))
    return cases


@pytest.mark.parametrize("case", _layout_cases(), ids=case_ids(_layout_cases()))
def test_layouts_and_shapes_cuda(case):
    run_case(case, device="cuda")


# ---------------------------------------------------------------------------------------------------
# Half precision: SPEC.md's rule against the naive composition run in the same dtype (mean over draws)
# ---------------------------------------------------------------------------------------------------

HALF_CASES = [
    Case(kind, kwargs, shape, dtype, layout=layout, train=train)
    for (kind, kwargs, shape) in (
        ("ms", dict(scales=(1, 2, 4), kernel_size=3), (4, 16, 32, 32)),
        ("ms", dict(scales=(1, 2, 4), down_mode="bilinear", kernel_size=3, norm="batch", activation="silu"),
         (4, 8, 27, 21)),
        ("psp", dict(bins=(1, 2, 3, 6), kernel_size=1, branch_channels=8), (8, 32, 24, 24)),
    )
    for dtype in (torch.float16, torch.bfloat16)
    for layout in ("contiguous", "channels_last")
    for train in (False, True)
]


@pytest.mark.parametrize("case", HALF_CASES, ids=case_ids(HALF_CASES))
def test_half_precision_cuda(case):
    check_half_precision_grads(case, device="cuda")


# ---------------------------------------------------------------------------------------------------
# Determinism and empty inputs
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,kwargs", [
    ("ms", dict(scales=(1, 2, 4), kernel_size=3, norm="batch")),
    ("psp", dict(bins=(1, 2, 3, 6), kernel_size=1)),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bit_identical_gradients_cuda(kind, kwargs, dtype):
    _, fused = build_case(Case(kind, kwargs, (4, 8, 29, 31), dtype, train=True))
    fused = fused.cuda()
    x = make_input((4, 8, 29, 31), dtype, "contiguous", device="cuda").requires_grad_(True)
    g = torch.randn(4, fused.out_channels, 29, 31, device="cuda").to(dtype)
    runs = []
    for _ in range(2):
        out = fused(x)
        runs.append([out.detach().clone()] + list(torch.autograd.grad(out, [x] + list(fused.parameters()), g)))
    for a, b in zip(*runs):
        assert torch.equal(a, b), "the CUDA backend's results differ between two identical runs"


def test_deterministic_mode_cuda(monkeypatch):
    """torch.use_deterministic_algorithms(True) without CUBLAS_WORKSPACE_CONFIG: ATen refuses cuBLAS then,
    so the weight gradient must not use it; the results match the default mode's within float32 rounding
    and repeat bit for bit."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    _, fused = build_case(Case("ms", dict(scales=(1, 2), kernel_size=3, norm="batch"), (2, 5, 17, 19),
                               torch.float32, train=True))
    fused = fused.cuda()
    x = make_input((2, 5, 17, 19), torch.float32, "channels_last", device="cuda").requires_grad_(True)
    g = torch.randn(2, fused.out_channels, 17, 19, device="cuda")

    def grads():
        out = fused(x)
        return [out.detach()] + list(torch.autograd.grad(out, [x] + list(fused.parameters()), g))

    default = grads()
    torch.use_deterministic_algorithms(True)
    try:
        first, second = grads(), grads()
    finally:
        torch.use_deterministic_algorithms(False)
    for a, b, c in zip(first, second, default):
        assert torch.equal(a, b), "deterministic mode: two identical runs differ"
        assert torch.allclose(a, c, rtol=1e-4, atol=1e-5), (a - c).abs().max()


@pytest.mark.parametrize("kind,kwargs", [("ms", dict(scales=(1, 2))), ("psp", dict(bins=(1, 3)))])
def test_empty_batch_cuda(kind, kwargs):
    _, fused = build_case(Case(kind, kwargs, (2, 3, 8, 8), torch.float32))
    fused = fused.cuda()
    x = torch.zeros(0, 3, 8, 8, device="cuda", requires_grad=True)
    out = fused(x)
    assert out.shape == (0, fused.out_channels, 8, 8)
    out.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


def test_large_kernel_cuda():
    """Any odd kernel size: the convolutions are ATen's (cuDNN)."""
    run_case(Case("ms", dict(scales=(1, 2), kernel_size=9), (2, 3, 21, 19), torch.float64, train=True), device="cuda")


@pytest.mark.parametrize("kind,kwargs", [
    ("ms", dict(scales=(1, 2, 4), kernel_size=3, norm="batch")),
    ("psp", dict(bins=(1, 2, 3, 6), kernel_size=3, norm="batch")),
    ("psp", dict(bins=(1, 2, 3, 6), kernel_size=1, norm="batch", project=dict(out_channels=16, kernel_size=3))),
])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_bit_identical_gradients_whatever_the_cudnn_flags(kind, kwargs, layout):
    """cudnn.benchmark on and cudnn.deterministic off (where cuDNN may pick algorithms with atomics for the
    weight and data gradients): the CUDA backend's convolutions still use deterministic ones, so two runs
    give bit-identical outputs and gradients, and the user's flags are left as they were."""
    _, fused = build_case(Case(kind, kwargs, (4, 32, 33, 35), torch.float32, train=True))
    fused = fused.cuda()
    x = make_input((4, 32, 33, 35), torch.float32, layout, device="cuda").requires_grad_(True)
    g = torch.randn(4, fused.out_channels, 33, 35, device="cuda")
    old = torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = True, False
    try:
        runs = []
        for _ in range(3):
            out = fused(x)
            runs.append([out.detach().clone()] + list(torch.autograd.grad(out, [x] + list(fused.parameters()), g)))
            assert torch.backends.cudnn.benchmark is True and torch.backends.cudnn.deterministic is False
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = old
    for run in runs[1:]:
        for a, b in zip(runs[0], run):
            assert torch.equal(a, b), "cudnn.benchmark=True, deterministic=False: two identical runs differ"


# ---------------------------------------------------------------------------------------------------
# The block with its projection (SPEC.md, "The projection"): test_projection.py's grid, on CUDA
# ---------------------------------------------------------------------------------------------------
from .test_projection import GRID as _PROJECTION_GRID  # noqa: E402


@pytest.mark.parametrize("case", _PROJECTION_GRID, ids=[c.id for c in _PROJECTION_GRID])
def test_projection_cuda(case):
    run_case(case, device="cuda")
