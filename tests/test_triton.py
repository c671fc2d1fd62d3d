"""The Triton backend through the same modules, operators and autograd: ``use_backend('triton')``.

On a machine without a GPU the kernels run on CPU tensors in Triton's interpreter (``TRITON_INTERPRET=1``,
set by conftest.py before msfused is imported); with a GPU they run on CUDA tensors. The interpreter is
slow, so the grid here is small but covers every mode: down x up modes, align_corners, kernel sizes, norm
none / eval / train (momentum None, no affine, no running statistics), activations, input positions,
bins that do not divide the map, every input layout, float64 / float32 against SPEC.md's tolerances,
bfloat16 / float16 by its half-precision rule, float64 gradcheck, opcheck, determinism, empty input and
the int32 indexing limit.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch.func import functional_call

import msfused
from msfused.triton import launch
from msfused.triton.ops import absent_as_empty

from .conftest import (
    LAYOUTS, Case, OpNames, assert_memory_format, build_case, build_pair, case_ids, check_half_precision_grads,
    make_input, norm_err, reference64, run_case,
)
from .test_opcheck import op_arguments

OK, WHY = msfused.availability("triton")
pytestmark = pytest.mark.skipif(not OK, reason=f"Triton backend unavailable: {WHY}")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _triton_backend(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # SPEC.md's float32 tolerance: TF32 off
    monkeypatch.setattr(launch, "POISON", True)  # every kernel-filled buffer starts as NaN
    with msfused.use_backend("triton"):
        yield


ACTS = ("relu", "silu", "gelu", None)
POSITIONS = ("first", "last", None)
NORMS = ((None, False), ("batch", False), ("batch", True))


def _factor_grid():
    cases = []
    grid = itertools.product(("avg", "bilinear", "nearest"), ("bilinear", "nearest"), (False, True))
    for i, (down, up, ac) in enumerate(grid):
        norm, train = NORMS[i % 3]
        kwargs = dict(scales=(1, 2, 3), down_mode=down, up_mode=up, align_corners=ac, kernel_size=(1, 3)[i % 2],
                      activation=ACTS[i % 4], input_position=POSITIONS[(i // 2) % 3], norm=norm,
                      branch_channels=(3, 2, 4)[i % 3])
        shape = ((2, 3, 7, 9), (3, 4, 10, 13), (2, 5, 11, 8))[i % 3]
        dtype = (torch.float64, torch.float32)[i % 2]
        cases.append(Case("ms", kwargs, shape, dtype, train=train, steps=2 if train else 1, label="tr"))
    return cases


@pytest.mark.parametrize("case", _factor_grid(), ids=case_ids(_factor_grid()))
def test_factor_modes(case):
    run_case(case, device=DEVICE)


BINS_CASES = [
    Case("psp", dict(bins=(1, 2, 3, 6), up_mode="bilinear", norm="batch", branch_channels=4), (2, 6, 13, 11),
         train=True, steps=2, label="tr"),
    Case("psp", dict(bins=((2, 5), (5, 2), 3), up_mode="nearest", align_corners=True, kernel_size=3,
                     activation="silu", input_position="last", bias=True), (2, 4, 9, 7), torch.float32, label="tr"),
    Case("psp", dict(bins=((8, 6), 20, 1), align_corners=True, norm="batch", activation="gelu", input_position=None),
         (3, 3, 5, 5), train=False, label="tr"),
    Case("psp", dict(bins=(1, 2, 3, 6), bias=(True, False, False, False), norm=(None, "batch", "batch", "batch"),
                     align_corners=True, input_position="last", branch_channels=3), (3, 5, 12, 12), torch.float32,
         train=True, steps=2, label="tr_psp_smp"),
    # Image pooling (every level 1x1, x not in the output): backward on the 1x1 level, x's gradient a
    # broadcast view of it.
    Case("psp", dict(bins=(1, 1), branch_channels=(3, 2), kernel_size=(3, 1), norm="batch", activation="silu",
                     up_mode="nearest", input_position=None), (2, 5, 9, 7), layout="channels_last", train=True,
         label="tr_image_pool"),
    Case("psp", dict(bins=(1,), align_corners=True, bias=True, input_position=None), (3, 4, 6, 11), torch.float32,
         label="tr_image_pool"),
]


@pytest.mark.parametrize("case", BINS_CASES, ids=case_ids(BINS_CASES))
def test_bins(case):
    run_case(case, device=DEVICE)


LAYOUT_CASES = [
    Case("ms", dict(scales=(1, 2), down_mode=("avg", "bilinear", "nearest")[i % 3], norm="batch",
                    activation=ACTS[i % 4], kernel_size=(3, 1)), (2, 4, 9, 8), (torch.float64, torch.float32)[i % 2],
         layout, train=bool(i % 2), steps=1 + i % 2, label="tr")
    for i, layout in enumerate(LAYOUTS)
]


@pytest.mark.parametrize("case", LAYOUT_CASES, ids=case_ids(LAYOUT_CASES))
def test_layouts(case):
    run_case(case, device=DEVICE)


OTHER_CASES = [
    # per-branch kernel sizes and channels, 5x5, odd factor larger than part of the map
    Case("ms", dict(scales=(1, 2, 5), kernel_size=(5, 1, 3), branch_channels=(2, 5, 1), bias=(True, False, True),
                    norm=(None, "batch", None), activation="gelu"), (2, 3, 11, 10), train=True, steps=2, label="tr"),
    # norm variants: momentum None, affine False, no running statistics (batch statistics in eval)
    Case("ms", dict(scales=(1, 2), norm="batch"), (2, 3, 8, 7), torch.float32, train=True, steps=3,
         norm_overrides={0: dict(momentum=None), 1: dict(affine=False)}, label="tr_norms"),
    Case("psp", dict(bins=(1, 3), norm="batch", activation="silu"), (2, 3, 7, 7), train=False,
         norm_overrides={0: dict(track_running_stats=False)}, label="tr_norms"),
    # one input channel, one output channel, no activation, x not in the output
    Case("ms", dict(scales=(2,), branch_channels=1, activation=None, input_position=None), (1, 1, 5, 6),
         label="tr_tiny"),
    # six branches: every launch that packs up to four branches runs twice, the second time part full,
    # with batch-statistics and folded-norm branches mixed in each pack
    Case("psp", dict(bins=(1, 2, 3, 6, (4, 5), 7), branch_channels=(2, 3, 1, 2, 3, 2),
                     norm=("batch", None, "batch", "batch", None, "batch"), bias=(False, True, False, False, True, False),
                     activation="silu"), (2, 3, 9, 11), torch.float64, train=True, steps=2, label="tr_six"),
]


@pytest.mark.parametrize("case", OTHER_CASES, ids=case_ids(OTHER_CASES))
def test_other_configurations(case):
    run_case(case, device=DEVICE)


SMALL_BLOCK_CASES = [
    Case("ms", dict(scales=(1, 2, 3), kernel_size=3, branch_channels=(5, 3, 6), norm=("batch", None, "batch"),
                    down_mode="bilinear", activation="gelu"), (2, 3, 11, 9), train=True, steps=2, label="small"),
    OTHER_CASES[-1],  # six branches
]


@pytest.mark.parametrize("case", SMALL_BLOCK_CASES, ids=case_ids(SMALL_BLOCK_CASES))
def test_small_blocks(case, monkeypatch):
    """The interpreter's blocks are large (it is faster so), so the small maps above fit one tile and one
    channel block. Here blocks of 16 pixels and 4 channels make every kernel run many tiles and channel
    blocks: the per-tile partial sums and their fixed-order combination, the split reductions' partials,
    and each packed launch's per-branch program ranges, are then really exercised."""
    monkeypatch.setattr(launch, "_block_p", lambda: 16)
    monkeypatch.setattr(launch, "_block_c", lambda c, f64=False: 4)
    monkeypatch.setattr(launch, "_pool_blocks", lambda dt: (16, 16))  # (tl.dot's smallest)
    monkeypatch.setattr(launch, "POOL_PIXELS_PER_CELL", 0)  # pooled in chunks however many cells
    monkeypatch.setattr(launch, "_convs_block_m", lambda f64: 16)
    monkeypatch.setattr(launch, "_fill_programs", lambda: 64)  # long reductions split into partials
    monkeypatch.setattr(launch, "SPLIT_STEPS", 4)  # pooling windows in chunks (bins)
    monkeypatch.setattr(launch, "ADJOINT_STEPS", 2)  # up-resize adjoints in chunks of reader rows
    monkeypatch.setattr(launch, "_run_budget", lambda: 32)  # several column tiles per level row
    monkeypatch.setattr(launch, "COLUMN_CHUNK_ROWS", 8)  # the partials' column sums in chunks of rows
    run_case(case, device=DEVICE)


INFERENCE_CASES = [
    Case("ms", dict(scales=(1, 2, 4), down_mode="avg", norm="batch", activation="relu"), (2, 3, 19, 23),
         layout="channels_last", label="inf"),
    Case("ms", dict(scales=(1, 3), down_mode="bilinear", up_mode="bilinear", align_corners=True, kernel_size=(5, 3),
                    activation="gelu", input_position="last", branch_channels=(2, 20)), (1, 3, 40, 37),
         torch.float32, layout="slice_h", label="inf"),
    Case("ms", dict(scales=(2, 5), down_mode="nearest", up_mode="nearest", activation="silu", input_position=None),
         (2, 4, 17, 11), torch.float32, layout="transposed", label="inf"),
    Case("psp", dict(bins=(1, 2, 3, 6, (9, 13)), norm="batch", activation="silu", input_position=None),
         (2, 5, 11, 13), label="inf"),
    Case("psp", dict(bins=(1, (20, 3)), kernel_size=3, up_mode="nearest", norm="batch", bias=True),
         (2, 5, 11, 13), torch.float32, layout="channels_last_slice", label="inf"),
]


@pytest.mark.parametrize("case", INFERENCE_CASES, ids=case_ids(INFERENCE_CASES))
def test_inference_path(case):
    """No gradient needed and norms folded: the inference operator (one launch per branch: the level's
    conv computed from x in the operand load, epilogue, up-resize from the tile) against the float64
    reference; tiles wider than one program's (37 columns at 16 per tile) and odd factors included."""
    naive, fused = build_case(case)
    fused.to(DEVICE).eval()
    ref = reference64(naive).eval()
    x = make_input(case.shape, case.dtype, case.layout, device=DEVICE)
    calls = []
    real = launch.inference
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(launch, "inference", lambda *a: calls.append(1) or real(*a))
        with torch.no_grad():
            out = fused(x)
    assert calls, "the inference operator was not used"
    assert out.dtype == case.dtype and not torch.isnan(out).any()
    assert_memory_format(out, x, case.id)
    err = norm_err(out, ref(x.to("cpu", torch.float64)))
    tol = {torch.float64: 1e-10, torch.float32: 1e-5}[case.dtype]
    assert err <= tol, f"{case.id}: err {err:.3e} > {tol:.0e}"


@pytest.mark.parametrize("case", INFERENCE_CASES, ids=case_ids(INFERENCE_CASES))
def test_inference_path_large_blocks(case, monkeypatch):
    """A large block (SPLIT_OUTPUTS lowered so that these are) runs its inference as the training forward
    without batch statistics: the levels (pooled for bins), convolutions with the folded norms' epilogue,
    up-resize; the same results."""
    monkeypatch.setattr(launch, "SPLIT_OUTPUTS", 1)
    launched = []
    real_launch = launch._launch
    monkeypatch.setattr(launch, "_launch",
                        lambda kernel, *a, **k: (launched.append(kernel), real_launch(kernel, *a, **k)))
    test_inference_path(case)
    from msfused.triton.plan import kernel_name

    names = {kernel_name(k) for k in launched}
    levels = "pool_kernel" if case.kind == "psp" else "levels_kernel"
    assert "block_kernel" not in names and {levels, "convs_kernel", "ups_kernel"} <= names, names


def test_inference_split_pooling(monkeypatch):
    """Pooling windows in chunks (SPLIT_STEPS shrunk so that small maps split too): their partial sums
    are summed by the block kernel's down taps, still two launches."""
    monkeypatch.setattr(launch, "SPLIT_STEPS", 4)
    test_inference_path(INFERENCE_CASES[3])


POOL_CASES = [  # (levels as bins, shape, dtype, layout, small blocks: pixel chunks and channel blocks)
    ((1, 2, 3, 6), (2, 5, 13, 11), torch.float64, "contiguous", False),
    ((1, 2, 3, 6), (2, 19, 13, 11), torch.float32, "channels_last", True),
    ((2, (3, 5), 1), (3, 4, 9, 14), torch.float32, "transposed", True),
    (((4, 1), 6), (1, 3, 17, 7), torch.float64, "channels_last_slice", True),
    ((1, 3), (2, 20, 10, 12), torch.bfloat16, "slice_h", True),
    ((11, 6), (2, 3, 12, 12), torch.float32, "contiguous", False),  # 121 + 36 cells: two launches
]


@pytest.mark.parametrize("case", POOL_CASES, ids=[f"{c[3]}-{c[2]}-small{c[4]:d}" for c in POOL_CASES])
@pytest.mark.parametrize("combine", [True, False], ids=["combined", "partials"])
def test_pool_levels(case, combine, monkeypatch):
    """pool_kernel against ATen's adaptive_avg_pool2d: every level of a launch from one read of x, x's copy
    into its output slice, pixel chunks (small blocks: partials summed by the combine launch, or returned
    with the taps that sum them), every layout (dense rows or not), and non-finite values: a window holding
    a NaN, or +Inf and -Inf, is NaN, one holding one infinity is that infinity, the rest finite and exact."""
    bins, shape, dtype, layout, small = case
    if small:
        monkeypatch.setattr(launch, "_pool_blocks", lambda dt: (16, 16))
        monkeypatch.setattr(launch, "_fill_programs", lambda: 64)
        monkeypatch.setattr(launch, "POOL_PIXELS_PER_CELL", 0)
    levels = [(b, b) if isinstance(b, int) else b for b in bins]
    flat_bins = [v for hw in levels for v in hw]
    N, C, H, W = shape
    x = make_input(shape, dtype, layout, device=DEVICE)
    x[0, 1, 2, 3] = float("nan")
    x[N - 1, C - 1, H - 1, W - 1] = float("inf")
    x[N - 1, C - 1, H - 2, W - 1] = -float("inf")
    x[N - 1, 0, 0, 0] = float("inf")
    out = torch.empty((N, C + 3, H, W), dtype=dtype, device=DEVICE,
                      memory_format=torch._prims_common.suggest_memory_format(x)).fill_(float("nan"))
    branches = list(range(len(levels)))
    launched = []
    real_launch = launch._launch
    monkeypatch.setattr(launch, "_launch",
                        lambda kernel, *a, **k: (launched.append(kernel), real_launch(kernel, *a, **k)))
    made = launch._launch_levels(x, out, 2, True, branches, [0] * len(levels), flat_bins, "avg", False,
                                 combine=combine)
    pools = 1 + (sum(h * w for h, w in levels) > launch.MAX_POOL_CELLS)
    assert launched.count(launch.K.pool_kernel) == pools and launch.K.levels_kernel not in launched[:pools]
    assert torch.equal(out[:, 2:2 + C].cpu().nan_to_num(7.0), x.cpu().nan_to_num(7.0))  # (x's one NaN)
    assert torch.isnan(out[:, :2]).all() and torch.isnan(out[:, 2 + C:]).all()  # nothing outside the slice
    x64 = x.cpu().double()
    for b, (h, w) in enumerate(levels):
        src, (ty, tx) = made[b]
        src = src.cpu().double()
        # the level as the block kernel reads it: rows through the y taps (a sum of chunks), columns identity
        rows = [sum(src[:, :, int(i)] * float(wt) for i, wt in zip(ty.idx[r].cpu(), ty.w[r].cpu()) if i >= 0)
                for r in range(h)]
        got = torch.stack(rows, 2)
        assert torch.equal(tx.idx[:, 0].cpu(), torch.arange(w, dtype=torch.int32))
        ref = torch.nn.functional.adaptive_avg_pool2d(x64, (h, w))
        for mask in (torch.isnan, torch.isposinf, torch.isneginf):
            assert torch.equal(mask(got), mask(ref)), (b, mask.__name__)
        fin = torch.isfinite(ref)
        tol = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 1e-2}[dtype]
        err = (got[fin] - ref[fin]).abs().max().item()
        assert err <= tol * max(1.0, ref[fin].abs().max().item()), (b, err)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_dx_output_gradient_any_strides(layout, monkeypatch):
    """dx_kernel addresses dx and the output gradient's x slice linearly in a plane's pixels where their rows
    are dense, by row and column otherwise: an output gradient whose rows are not dense (a transposed view)
    gives the same dx, every element written, and dx = g's slice + each level's down-resize adjoint (against
    autograd of the reference's avg pooling), over several pixel blocks per plane (blocks of 16)."""
    monkeypatch.setattr(launch, "_block_p", lambda: 16)
    N, C, H, W = 2, 3, 9, 7
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = make_input((N, C, H, W), torch.float64, layout, device=DEVICE)
    grad = torch.randn(N, C + 2, H, W, dtype=torch.float64, device=DEVICE).contiguous(memory_format=fmt)
    level_grad = torch.randn(N, C, 4, 3, dtype=torch.float64, device=DEVICE)
    taps = launch._down_taps(2, "avg", H, W, 4, 3, False, torch.float64, x.device)
    dense = launch._dx(grad, x, 1, [(level_grad, taps)], fmt, torch.float64)
    strided_grad = grad.transpose(2, 3).contiguous().transpose(2, 3)  # the same values, rows not dense
    assert not launch._dense_rows(strided_grad[:, 1:1 + C])
    other = launch._dx(strided_grad, x, 1, [(level_grad, taps)], fmt, torch.float64)
    assert torch.equal(dense, other)
    xr = x.detach().cpu().clone().requires_grad_(True)
    torch.nn.functional.avg_pool2d(xr, 2).backward(level_grad.cpu())
    assert torch.allclose(dense.cpu(), grad[:, 1:1 + C].cpu() + xr.grad, rtol=0, atol=1e-12)


def test_backward_gets_no_zero_gradients_for_saved_outputs():
    """The forward operator's other outputs (levels, conv outputs, batch statistics) are what backward needs:
    autograd passes None for their gradients (``set_materialize_grads(False)``) instead of a zero tensor of
    each one's shape, allocated and filled per training step (16 for a 4-branch block); the gradients are
    still the naive block's."""
    naive, fused = build_pair("psp", 3, dict(bins=(1, 2, 3, 6), norm="batch", branch_channels=2), torch.float64)
    naive.train(), fused.to(DEVICE).train()
    x = make_input((2, 3, 9, 8), torch.float64)
    xf = x.to(DEVICE).requires_grad_(True)
    with OpNames() as ops:
        fused(xf).sum().backward()
    assert any("multi_scale_backward_triton" in n for n in ops.names), ops.names
    assert not [n for n in ops.names if n.startswith(("aten.zeros", "aten.zero_", "aten.fill_"))], ops.names
    xn = x.detach().clone().requires_grad_(True)
    naive(xn).sum().backward()
    assert (xf.grad.cpu() - xn.grad).norm() <= 1e-10 * xn.grad.norm()


def test_autotuner_fast_key_finds_what_triton_tuned(monkeypatch):
    """launch._Autotuner looks a call's key up in one pass over the arguments; the key must be Triton's own (the
    key arguments' values, then the tensor arguments' dtypes), so that a configuration Triton's ``run`` tuned
    is found without tuning again, and a new size or dtype is tuned (stand-in timings: 32 wins)."""
    import triton
    import triton.language as tl
    from triton.runtime.autotuner import Autotuner

    @triton.jit
    def add(a, b, out, N, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(out + i, tl.load(a + i, mask=i < N) + tl.load(b + i, mask=i < N), mask=i < N)

    tuner = launch._autotune([triton.Config({"BLOCK": 16}), triton.Config({"BLOCK": 32})], key=["N"])(add)
    monkeypatch.setattr(Autotuner, "_bench", lambda self, *a, config=None, **k: [48.0 - config.kwargs["BLOCK"]])
    tuned = []
    real_run = Autotuner.run
    monkeypatch.setattr(Autotuner, "run", lambda self, *a, **k: (tuned.append(k["grid"]), real_run(self, *a, **k))[1])
    for n, dtype, new in ((40, torch.float32, True), (40, torch.float32, False), (50, torch.float32, True),
                          (40, torch.float64, True), (50, torch.float32, False)):
        a, b = torch.randn(n, dtype=dtype, device=DEVICE), torch.randn(n, dtype=dtype, device=DEVICE)
        out = torch.full_like(a, float("nan"))
        before = len(tuned)
        tuner[lambda meta: (triton.cdiv(n, meta["BLOCK"]),)](a, b, out, n)
        assert len(tuned) == before + new, (n, dtype)
        assert torch.equal(out, a + b)
        assert tuner.best_config.kwargs == {"BLOCK": 32}
    assert len(tuner.cache) == 3


@pytest.mark.parametrize("value", ["inf", "nan"])
def test_batch_statistics_nonfinite(value, monkeypatch):
    """Inf or NaN in x with batch statistics over many tiles (16 pixels each): the same elements NaN / +Inf /
    -Inf in the output and in the running statistics as the naive block's; a branch whose pre-activation holds
    a one-signed Inf keeps a running mean of that Inf (ATen's sum / count), which stats_combine_kernel's Chan
    combination alone would make NaN (Inf - Inf)."""
    monkeypatch.setattr(launch, "_convs_block_m", lambda f64: 16)
    naive, fused = build_pair("ms", 1, dict(scales=(1, 2), kernel_size=1, branch_channels=2, norm="batch",
                                            activation="relu"), torch.float64)
    naive.train(), fused.to(DEVICE).train()
    x = make_input((2, 1, 9, 11), torch.float64)
    x[1, 0, 6, 4] = float(value)
    out, ref = fused(x.to(DEVICE)).cpu(), naive(x)
    for name, mask in (("NaN", torch.isnan), ("+Inf", torch.isposinf), ("-Inf", torch.isneginf)):
        assert torch.equal(mask(out), mask(ref)), name
        for (n, a), (_, b) in zip(fused.named_buffers(), naive.named_buffers()):
            if a.is_floating_point():
                assert torch.equal(mask(a.cpu()), mask(b)), f"{name} in {n}"
    finite = torch.isfinite(ref)
    assert (out[finite] - ref[finite]).norm() <= 1e-10 * max(ref[finite].norm(), 1.0)
    if value == "inf":  # one input channel: each branch channel's pre-activation holds a one-signed Inf
        assert any(torch.isinf(b).any() for n, b in naive.named_buffers() if n.endswith("running_mean"))


def _same_nonfinite(got, ref, what):
    for name, mask in (("NaN", torch.isnan), ("+Inf", torch.isposinf), ("-Inf", torch.isneginf)):
        assert torch.equal(mask(got), mask(ref)), f"{what}: {name} elements differ"
    finite = torch.isfinite(ref)
    assert (got[finite] - ref[finite]).abs().max() <= 1e-12 * max(ref[finite].abs().max(), 1.0), what


@pytest.mark.parametrize("up", ["bilinear", "nearest"])
@pytest.mark.parametrize("value", ["inf", "nan"])
def test_run_gathers_match_aten_with_nonfinite_values(up, value, monkeypatch):
    """The run gathers (kernels._run_gather: a destination column's taps read as a run along the lanes) against
    ATen, element for element, with Inf or NaN among their inputs: the factor levels from x (levels_kernel:
    avg and bilinear down-resizes; bin levels: pool_kernel) and every up-resize's adjoint at its level
    (up_adjoints_kernel; the gradient at the conv output, seen by the weight gradient). The same NaN / +Inf /
    -Inf elements and the finite values to float64 rounding: a zero tap weight still turns an Inf or NaN into
    NaN, as ATen's resize and its adjoint read every tap (an edge column's clamped taps weigh 0)."""
    F = torch.nn.functional
    gen = torch.Generator().manual_seed(5)
    seen, real = [], launch._wgrad
    monkeypatch.setattr(launch, "_wgrad", lambda src, dpre, *a: (seen.append(dpre.clone()), real(src, dpre, *a))[1])
    N, C, H, W = 2, 2, 13, 17
    for factor, bins, down in (([2, 4], [0] * 4, "avg"), ([3, 2], [0] * 4, "bilinear"), ([0, 0], [2, 2, 3, 5], "avg")):
        x = torch.randn(N, C, H, W, dtype=torch.float64, generator=gen)
        x[1, 0, 5, 9] = x[0, 1, 0, W - 1] = float(value)
        weight = [torch.eye(C, dtype=x.dtype).reshape(C, C, 1, 1).to(DEVICE)] * 2
        none = [None] * 2
        args = dict(factor=factor, bins=bins, down_mode=down, up_mode=up, align_corners=False, activation="none",
                    input_position="none")
        out, level, pre, mean, var = launch.forward(x.to(DEVICE), weight, none, none, none, [False] * 2, [0.0] * 2,
                                                    **args)
        grad = torch.randn(out.shape, dtype=x.dtype, generator=gen)
        grad[0, 1, 3, 2] = grad[1, C, H - 1, W - 1] = float(value)
        seen.clear()
        launch.backward(grad.to(DEVICE), x.to(DEVICE), weight, none, none, level, pre, mean, var, [False] * 2,
                        [0.0] * 2, **args, output_mask=[True, True])
        for b in range(2):
            f = factor[b]
            h, w = (H // f, W // f) if f else (bins[2 * b], bins[2 * b + 1])
            if f == 0:
                ref = F.adaptive_avg_pool2d(x, (h, w))
            elif down == "avg":
                ref = F.avg_pool2d(x, kernel_size=f, stride=f)
            else:
                ref = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
            _same_nonfinite(level[b].cpu(), ref, f"level {b} ({down}, {h}x{w})")
            lv = torch.zeros((N, C, h, w), dtype=x.dtype, requires_grad=True)
            kw = dict(align_corners=False) if up == "bilinear" else {}
            ref, = torch.autograd.grad(F.interpolate(lv, size=(H, W), mode=up, **kw), lv, grad[:, b * C:(b + 1) * C])
            _same_nonfinite(seen[b].cpu().reshape(N, h, w, C).permute(0, 3, 1, 2), ref, f"adjoint {b} ({up}, {h}x{w})")


def test_parameter_grads_without_x_grad():
    case = Case("ms", dict(scales=(1, 2), norm="batch", activation="silu"), (2, 3, 7, 6), train=True, label="tr")
    run_case(case, x_requires_grad=False, device=DEVICE)


HALF_CASES = [
    Case("ms", dict(scales=(1, 2, 4), norm="batch", activation="gelu", branch_channels=8), (2, 8, 13, 11),
         torch.bfloat16, train=True, label="tr_bf16"),
    Case("psp", dict(bins=(1, 2, 3, 6), activation="silu", branch_channels=8), (2, 8, 13, 11), torch.bfloat16,
         label="tr_bf16"),
    Case("ms", dict(scales=(1, 2), down_mode="bilinear", activation="silu", branch_channels=8), (2, 8, 11, 9),
         torch.float16, layout="channels_last", label="tr_f16"),
]


@pytest.mark.parametrize("case", HALF_CASES, ids=case_ids(HALF_CASES))
def test_half_precision(case):
    """bfloat16 / float16 output and gradients against the float64 reference within SPEC.md's rule: mean
    err (over 8 fresh draws) <= 2 x the naive module's own mean err in that dtype + 1e-3. Conv biases before
    batch statistics (true gradient 0) are left to the float32/float64 checks."""
    check_half_precision_grads(case, trials=8, device=DEVICE)


def test_gradcheck():
    case = Case("ms", dict(scales=(1, 2), down_mode="bilinear", norm="batch", activation="silu", branch_channels=2,
                           kernel_size=(3, 1), input_position="last"), (2, 2, 5, 4), train=True, label="tr_gc")
    _, fused = build_case(case)
    fused.to(DEVICE)
    names = [n for n, _ in fused.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for _, p in fused.named_parameters()]
    buffers = dict(fused.named_buffers())
    x = make_input(case.shape, torch.float64, device=DEVICE).requires_grad_(True)

    def f(x, *ps):
        state = {**dict(zip(names, ps)), **{n: b.clone() for n, b in buffers.items()}}
        return functional_call(fused, state, (x,))

    # The interpreter runs ~1 s per call: gradcheck's fast mode (random directions) there, the full one on a GPU.
    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=DEVICE == "cpu")


FORWARD = torch.ops.msfused.multi_scale_forward_triton.default
BACKWARD = torch.ops.msfused.multi_scale_backward_triton.default
# The interpreter cannot run kernels on the fake tensors of AOT dispatch; on a GPU every check runs.
OPCHECK_UTILS = (("test_schema", "test_autograd_registration", "test_faketensor") if DEVICE == "cpu"
                 else ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"))
OP_CASES = [
    Case("ms", dict(scales=(1, 2), down_mode="bilinear", align_corners=True, norm="batch", activation="gelu",
                    input_position="last"), (2, 3, 7, 8), train=True, label="op_tr"),
    Case("psp", dict(bins=(1, 3), bias=(True, False), norm=(None, "batch"), input_position="first"), (2, 3, 7, 6),
         train=False, layout="channels_last", label="op_tr"),
]


def _triton_args(block, x, requires_grad):
    (x, weight, bias, scale, shift, batch_stats, eps), kw = op_arguments(block, x, requires_grad)
    bias, scale, shift = (absent_as_empty(ts, x) for ts in (bias, scale, shift))
    return (x, weight, bias, scale, shift, batch_stats, eps), kw


# The backward's output masks split over the two cases (each mask checked once: opcheck runs the operator
# many times, about a minute a call in the interpreter).
OP_MASKS = ([[True, True], [True, False]], [[False, True]])


@pytest.mark.parametrize("case,masks", list(zip(OP_CASES, OP_MASKS)), ids=case_ids(OP_CASES))
def test_opcheck(case, masks):
    _, fused = build_case(case)
    fused.to(DEVICE)
    x = make_input(case.shape, case.dtype, case.layout, device=DEVICE)
    args, kw = _triton_args(fused, x, requires_grad=True)
    torch.library.opcheck(FORWARD, args, kw, test_utils=OPCHECK_UTILS)
    args, kw = _triton_args(fused, x, requires_grad=False)
    out, level, pre, mean, var = FORWARD(*args, **kw)
    x, weight, _bias, scale, shift, batch_stats, eps = args
    for mask in masks:
        bargs = (torch.randn_like(out), x, weight, scale, shift, level, pre, mean, var, batch_stats, eps)
        torch.library.opcheck(BACKWARD, bargs, dict(kw, output_mask=mask), test_utils=OPCHECK_UTILS)
        gx, gw, gb, gs, gt = BACKWARD(*bargs, **kw, output_mask=mask)
        assert (gx.shape == x.shape) if mask[0] else gx.numel() == 0
        assert all((g.shape == w.shape) if mask[1] else g.numel() == 0 for g, w in zip(gw, weight))


def test_matches_cpu_operator_results():
    """The Triton operator returns what the C++ operator returns (level, pre, batch statistics too)."""
    if DEVICE != "cpu" or not msfused.availability("cpu")[0]:
        pytest.skip("compares with the CPU operator on CPU tensors (interpreter)")
    case = Case("psp", dict(bins=(1, 2, 3), norm="batch", activation="relu", branch_channels=3), (2, 4, 9, 7),
                train=True, label="tr")
    _, fused = build_case(case)
    x = make_input(case.shape, case.dtype, "channels_last")
    args, kw = op_arguments(fused, x, requires_grad=False)
    want = torch.ops.msfused.multi_scale_forward(*args, **kw)
    targs, kw = _triton_args(fused, x, requires_grad=False)
    got = FORWARD(*targs, **kw)
    for g, w in zip([got[0]] + [t for ts in got[1:] for t in ts], [want[0]] + [t for ts in want[1:] for t in ts]):
        assert g.shape == w.shape and g.dtype == w.dtype and g.stride() == w.stride()
        assert norm_err(g, w) <= 1e-12


def test_deterministic_gradients():
    """The same inputs give bit-identical gradients (no atomics; fixed-order reductions)."""
    naive, fused = build_pair("psp", 4, dict(bins=(1, 2, 3), norm="batch", activation="silu"), torch.float32)
    fused.to(DEVICE).train()
    x = make_input((2, 4, 9, 8), torch.float32, device=DEVICE)
    runs = []
    for _ in range(2):
        xi = x.clone().requires_grad_(True)
        m = copy.deepcopy(fused)
        out = m(xi)
        grads = torch.autograd.grad(out, [xi] + list(m.parameters()), torch.ones_like(out))
        runs.append([out] + list(grads))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_no_grad_saves_nothing_and_inference_mode():
    naive, fused = build_pair("ms", 3, dict(scales=(1, 2), norm="batch"), torch.float64)
    fused.to(DEVICE).eval()
    naive.eval()
    x = make_input((2, 3, 8, 6), device=DEVICE)
    with torch.inference_mode():
        out = fused(x)
    assert norm_err(out, naive(x.cpu())) <= 1e-10
    with torch.no_grad():
        assert fused(x).grad_fn is None


def test_empty_input():
    """An empty batch: the reference's (empty) result and gradient, no launch on an empty grid; an empty
    map is refused, as the reference's convolution refuses it."""
    naive, fused = build_pair("ms", 3, dict(scales=(1, 2), norm=None), torch.float32)
    fused.to(DEVICE)
    x = torch.randn((0, 3, 8, 8), device=DEVICE, requires_grad=True)
    out = fused(x)
    assert out.shape == naive(x.detach().cpu()).shape
    out.sum().backward()
    assert x.grad.shape == x.shape
    with torch.no_grad():
        assert fused(x).shape == out.shape  # the inference operator too
    with pytest.raises(ValueError, match="at least 1"):
        fused(torch.randn((2, 3, 0, 0), device=DEVICE))


def test_second_order_gradients_raise():
    _, fused = build_pair("ms", 2, dict(scales=(1, 2), activation="silu"), torch.float64)
    fused.to(DEVICE)
    x = make_input((1, 2, 6, 6), device=DEVICE, requires_grad=True)
    out = fused(x)
    with pytest.raises(RuntimeError, match="second-order"):
        torch.autograd.grad(out.sum(), x, create_graph=True)


def test_refuses_what_int32_cannot_index():
    """Past 2**31 elements the kernels' int32 offsets would wrap: refused up front with a clear message
    (a stride-0 expanded view: nothing of that size is allocated)."""
    _, fused = build_pair("ms", 2, dict(scales=(1, 2), branch_channels=1, input_position=None), torch.float32)
    fused.to(DEVICE)
    x = torch.zeros((1, 2, 1, 1), device=DEVICE).expand(2, 2, 2**15, 2**15)
    with pytest.raises(RuntimeError, match="2\\*\\*31"):  # the backend choice refuses it
        fused(x)
    # and the operator itself, called directly (arguments built on a small x, then the big view in its place)
    args, kw = _triton_args(fused, x[:1, :, :2, :2], requires_grad=False)
    with pytest.raises(ValueError, match="2\\*\\*31"):
        FORWARD(x, *args[1:], **kw)


@pytest.mark.skipif(DEVICE == "cpu", reason="torch.compile traces Triton kernels with fake tensors, which the "
                                            "interpreter cannot run: compiled on a GPU only")
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_compile_fullgraph(train):
    """torch.compile(fullgraph=True) through the Triton operators (one node each for dynamo), same numbers."""
    naive, fused = build_pair("psp", 8, dict(bins=(1, 2, 3, 6), norm="batch"), torch.float32)
    fused.to(DEVICE).train(train)
    eager = copy.deepcopy(fused)
    compiled = torch.compile(fused, fullgraph=True)
    x = make_input((2, 8, 13, 11), torch.float32, device=DEVICE, requires_grad=train)
    out, want = compiled(x), eager(x)
    assert norm_err(out, want) <= 1e-5
    if train:
        g = torch.randn_like(out)
        got = torch.autograd.grad(out, [x] + list(fused.parameters()), g)
        ref = torch.autograd.grad(want, [x] + list(eager.parameters()), g)
        for a, b in zip(got, ref):
            assert norm_err(a, b, g.norm().item()) <= 1e-5
