"""The CPU kernels' size-dependent code paths, each against the float64 reference (SPEC.md's tolerances),
with outputs NaN-poisoned (``torch.use_deterministic_algorithms`` with ``fill_uninitialized_memory``: every
tensor the kernels allocate starts as NaN, so an element they forget to write fails):

* the levels pass sums rows of ``x`` in register blocks of 64, 32 and 16 elements and then one at a time
  (widths that use every block and a tail), pooling windows as a sum scaled once, other resizes weighted;
* the up-resize expands each level row to the full width and blends two of them per output row;
* image pooling alone (every branch pools to 1x1, x not in the output) takes its levels from one mean of x
  (AVX-512 plane sums for contiguous float32 where ATen dispatches at AVX-512),
  and its backward runs on the 1x1 level, x's gradient a broadcast view;
* a 1x1 convolution (float32 / float64) runs as a GEMM, in either memory format;
* the convolution backward runs over chunks of the batch when a branch's conv-output gradient is large (without
  batch statistics, each chunk's gradient is made for the chunk alone: the whole one never exists);
* training peak memory of the fused block is at most the naive block's (no zero-filled gradients for the
  saved-tensor outputs, the chunked convolution backward).
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch

from msfused import _ops
from msfused.bench import runner, timing, workloads

from .conftest import Case, build_case, case_ids, make_input, run_case

pytestmark = pytest.mark.skipif(not _ops.has_kernel("CPU"), reason="msfused._C (the CPU kernels) is not built")


@contextlib.contextmanager
def nan_poisoned():
    """Every tensor ATen allocates for the kernels starts as NaN (torch's deterministic-mode fill)."""
    previous = torch.are_deterministic_algorithms_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)
        torch.utils.deterministic.fill_uninitialized_memory = fill


# Widths: 64 + 16 + 3 (every block and a tail), 48 (32 + 16), 67 (64 + 3); heights odd, bins that do not
# divide them; the psp_mmseg / aspp_pool configurations in miniature (bins 1 alone: image pooling).
POOL_CASES = [
    Case("psp", dict(bins=(1, 2, 3, 6), norm="batch", kernel_size=1), (2, 3, 13, 83), torch.float32,
         layout=layout, train=train, label="pool")
    for layout, train in (("contiguous", False), ("channels_last", True), ("slice_h", True),
                          ("channel_slice", False))
] + [
    Case("psp", dict(bins=(1,), input_position=None, norm="batch", align_corners=ac), (2, 17, 9, 67), dtype,
         layout=layout, label="image_pool")
    for dtype, layout, ac in ((torch.float32, "contiguous", False), (torch.float64, "channels_last", True),
                              (torch.float32, "transposed", False))
] + [
    # A contiguous float32 map of 37 x 41 = 1517 values: the AVX-512 plane means' 1024-value chunk, then
    # 64-value steps, 16-value steps and a scalar tail (ATen's mean where the CPU lacks AVX-512).
    Case("psp", dict(bins=(1,), input_position=None, norm="batch"), (3, 5, 37, 41), torch.float32, train=True,
         label="image_pool"),
] + [
    # Several image-pooling branches (one mean of x for all); a 1x1 convolution with bias as a GEMM in both
    # formats, at the level and at full resolution (factor 1).
    Case("psp", dict(bins=(1, 1), branch_channels=(3, 5), bias=(True, False), input_position=None,
                     activation="silu"), (3, 6, 7, 5), torch.float32, layout="channels_last", train=True,
         label="image_pool"),
    Case("ms", dict(scales=(1, 2), kernel_size=1, bias=True, norm="batch"), (2, 7, 9, 11), torch.float32,
         layout="channels_last", train=True, label="gemm_conv"),
    Case("ms", dict(scales=(1, 3), kernel_size=(1, 3), bias=True, input_position="last"), (2, 7, 9, 11),
         torch.float64, label="gemm_conv"),
    Case("psp", dict(bins=((2, 5), 7), up_mode="nearest", input_position="last"), (2, 4, 11, 48), torch.float64,
         layout="batch_strided", train=True, label="pool"),
    # Weighted (non-pooling) taps in the same blocks: bilinear and nearest downsampling.
    Case("ms", dict(scales=(1, 2, 3), down_mode="bilinear", align_corners=True, norm="batch"), (2, 3, 10, 83),
         torch.float32, train=True, label="weighted"),
    Case("ms", dict(scales=(2, 4), down_mode="nearest", up_mode="nearest", activation="silu"), (2, 5, 9, 70),
         torch.float64, layout="channels_last", label="weighted"),
    Case("ms", dict(scales=(1, 3), down_mode="avg", activation="gelu", input_position=None), (3, 2, 14, 67),
         torch.float32, layout="channels_last_slice", train=True, label="pool"),
]


@pytest.mark.parametrize("case", POOL_CASES, ids=case_ids(POOL_CASES))
def test_levels_and_up_paths(case):
    with nan_poisoned():
        run_case(case)


# A factor-1 branch whose conv-output gradient is 8 MiB per sample in float64 (16 x 256 x 256), over the
# 4 MiB chunk: the convolution backward runs one sample at a time (its weight and bias gradients summed).
CHUNK_CASES = [
    Case("ms", dict(scales=(1, 2), branch_channels=16, kernel_size=(3, 1), norm="batch", input_position=None),
         (3, 2, 256, 256), torch.float64, train=True, label="chunked_conv_backward"),
    Case("ms", dict(scales=(1,), branch_channels=16, kernel_size=3, bias=True), (3, 2, 256, 256), torch.float64,
         layout="channels_last", label="chunked_conv_backward"),
    # Eval-mode norm (no batch statistics): each chunk's conv-output gradient made for the chunk alone, the
    # norm's scale and shift gradients summed over the chunks.
    Case("ms", dict(scales=(1, 4), branch_channels=16, kernel_size=(1, 3), norm="batch", input_position="last"),
         (3, 2, 256, 256), torch.float64, label="chunked_conv_backward"),
]


@pytest.mark.parametrize("case", CHUNK_CASES, ids=case_ids(CHUNK_CASES))
def test_chunked_conv_backward(case):
    with nan_poisoned():
        run_case(case)
    # Bit-identical run to run.
    _, fused = build_case(case)
    x = make_input(case.shape, case.dtype, case.layout)
    g = torch.randn(case.shape[0], fused.out_channels, *case.shape[2:], dtype=case.dtype)
    runs = []
    for _ in range(2):
        m = copy.deepcopy(fused)
        xr = x.detach().clone(memory_format=torch.preserve_format).requires_grad_(True)
        runs.append(torch.autograd.grad(m(xr), [xr] + list(m.parameters()), g))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_image_pooling_gradient_is_a_broadcast(layout):
    """Image pooling (every level 1x1, x not in the output): x's gradient comes back as a broadcast view of
    the level's gradient, as ATen's mean gives it, so no full-size tensor is made inside the block's
    backward; a leaf's .grad is still a dense tensor in x's memory format."""
    case = Case("psp", dict(bins=(1, 1), branch_channels=(3, 2), norm="batch", input_position=None), (2, 5, 9, 7),
                torch.float64, layout=layout, train=True)
    naive, fused = build_case(case)
    x = make_input(case.shape, case.dtype, case.layout).requires_grad_(True)
    g = torch.randn(2, 5, 9, 7, dtype=case.dtype)
    (gx,) = torch.autograd.grad(fused(x), [x], g)
    assert gx.stride()[2:] == (0, 0)
    (ref,) = torch.autograd.grad(naive(x), [x], g)
    torch.testing.assert_close(gx, ref, rtol=1e-10, atol=1e-12)
    fused(x).backward(g)
    assert x.grad.stride() == x.stride()
    torch.testing.assert_close(x.grad, ref, rtol=1e-10, atol=1e-12)
    # Parameters only (x needs no gradient): the same 1x1 backward, no gradient of x made.
    x_const = x.detach()
    got = torch.autograd.grad(fused(x_const), list(fused.parameters()), g)
    want = torch.autograd.grad(naive(x_const), list(naive.parameters()), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["stem_pyramid", "pyramid_wide", "pyramid_seed", "aspp_pool"])
def test_training_peak_memory_at_most_naive(name):
    """The bench's peak-memory figure of one training step (CPU workload batch): fused <= naive."""
    built = workloads.build(workloads.WORKLOADS[name])
    runner.set_mode(built, "train")
    grad_out = runner.upstream_gradient(built)
    peaks = {}
    for impl in ("naive", "cpu"):
        step = runner.make_step(built, "train", impl, grad_out)
        with step.active():
            step()
            peaks[impl] = timing.peak_memory_bytes(step, "cpu")
    if peaks["naive"] is None:
        pytest.skip("the profiler gives no memory events here")
    assert peaks["cpu"] <= peaks["naive"], {k: v / 2**20 for k, v in peaks.items()}


def test_no_fused_multiply_add_in_the_cpu_kernels():
    """The CPU kernels' hottest loops are compiled per SIMD width and chosen at load (csrc/cpu/simd.h), and a
    result must not depend on which one the machine gets: GCC contracts a * b + c into one FMA (one rounding
    instead of two) in the AVX2 and AVX-512 clones unless told not to (setup.py's -ffp-contract=off), so the
    built library must hold no FMA instruction (the baseline x86-64 build has none to use)."""
    import platform
    import shutil
    import subprocess

    import msfused._C as ext

    objdump = shutil.which("objdump")
    if platform.machine() != "x86_64" or objdump is None:
        pytest.skip("needs x86-64 and binutils' objdump")
    text = subprocess.run([objdump, "-d", "--no-show-raw-insn", ext.__file__], capture_output=True, text=True,
                          check=True).stdout
    if "zmm" not in text:
        pytest.skip("built without simd.h's clones (not GCC on glibc): nothing to contract")
    fma = [line for line in text.splitlines() if any(op in line for op in ("vfmadd", "vfmsub", "vfnmadd", "vfnmsub"))]
    assert not fma, fma[:5]
