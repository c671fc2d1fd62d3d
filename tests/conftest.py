"""Shared helpers for the msfused test suite: the SPEC.md error metric, configuration cases, building a
naive + fused pair with identical random state, inputs in every layout, and the core comparison of the
fused module (default backend) against a float64 run of its naive twin.

Randomness: every test draws fresh random inputs and weights. The per-test seed is derived from the
session seed (``MSFUSED_TEST_SEED``, random when unset; printed in the header) and the test's node id, so
a failure can be replayed with ``MSFUSED_TEST_SEED=<seed> pytest <node id>``.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import os
import random
from typing import Dict, List, Optional, Sequence, Tuple

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch import nn

# Without a GPU the Triton backend runs its kernels on CPU tensors in Triton's interpreter; Triton reads
# the switch when the kernels are defined, so before msfused is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import msfused  # noqa: E402
from tests import frame_chunks  # noqa: E402

# CPython's freed frame-stack chunks kept for reuse in the test process (tests/frame_chunks.py: Triton's
# interpreter mapped and unmapped ~1 million of them in one test, two thirds of its time).
frame_chunks.install()

# ---------------------------------------------------------------------------------------------------
# Seeds
# ---------------------------------------------------------------------------------------------------

SESSION_SEED = int(os.environ.get("MSFUSED_TEST_SEED", random.SystemRandom().randrange(2**31)))
# Exported, so that pytest-xdist's workers (started after this import) and the tests' subprocesses
# draw from the same session seed that the header prints.
os.environ["MSFUSED_TEST_SEED"] = str(SESSION_SEED)


def pytest_report_header(config):
    chunks = frame_chunks.reason()
    return [f"msfused test seed: MSFUSED_TEST_SEED={SESSION_SEED}",
            "frame-stack chunks kept for reuse (tests/frame_chunks.py): " + ("yes" if chunks is None else f"no, {chunks}")]


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    # Again at the end: with -q (CI) the header is not shown, and a failure is replayed from this seed.
    terminalreporter.write_line(f"msfused test seed: MSFUSED_TEST_SEED={SESSION_SEED}")


# ---------------------------------------------------------------------------------------------------
# pytest-xdist (README's test command: -n auto --dist loadgroup)
# ---------------------------------------------------------------------------------------------------

# Modules whose module-scoped fixtures build something (the CMake project, the emulated CUDA library, nvcc
# compiles, the DDP process group, the launch plans): their tests share one worker, so it is built once.
# Every other test is handed out on its own, which keeps the workers evenly loaded.
BUILT_ONCE = ("test_cmake.py", "test_cuda_build.py", "test_cuda_emulation.py", "test_ddp.py", "test_launch_plan.py",
              "test_cuda_plan.py")
# Modules that share another's build: its group (the CUDA plan records the emulated CUDA library's launchers).
SHARED_BUILD = {"test_cuda_plan.py": "test_cuda_emulation"}


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the marks into the node ids
def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in BUILT_ONCE:
            item.add_marker(pytest.mark.xdist_group(SHARED_BUILD.get(item.path.name, item.path.stem)))


if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    # Workers share the cores: one worker's ATen ops get its share of them, not all (oversubscribed
    # threads on a small machine slow every worker down).
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


@pytest.fixture(autouse=True)
def _seed_every_test(request):
    """A fresh, reproducible seed per test (session seed + node id)."""
    digest = hashlib.sha256(f"{SESSION_SEED}:{request.node.nodeid}".encode()).hexdigest()
    seed = int(digest[:8], 16)
    torch.manual_seed(seed)
    random.seed(seed)
    yield seed


@pytest.fixture(autouse=True)
def _triton_bounds():
    """Every Triton kernel the interpreter runs has its memory accesses checked (tests/triton_bounds.py):
    an active lane outside every tensor argument fails the test, as it would fault on a GPU. The interpreter
    patches triton.language once per launch, not again at every helper call (tests/triton_interpreter.py:
    the same kernels, a quarter less time)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        yield
        return
    from tests.triton_bounds import checking
    from tests.triton_interpreter import patch_lang_once

    with checking(), patch_lang_once():
        yield


# ---------------------------------------------------------------------------------------------------
# The SPEC.md error metric (msfused/bench/accuracy.py: shared with the GPU check)
# ---------------------------------------------------------------------------------------------------

from msfused.bench.accuracy import (  # noqa: E402,F401  (re-exported for the tests)
    F32_ILL_CONDITIONED_FACTOR, F32_SENSITIVITY_FACTOR, TOL, ZERO_GRAD_K, ZeroGradProbe, half_precision_limit,
    norm_err,
    true_zero_gradients, uses_batch_stats, within_spec)


# ---------------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------------

LAYOUTS = ("contiguous", "channels_last", "slice_h", "transposed", "channels_last_slice", "batch_strided",
           "channel_slice")

_DTYPE_NAMES = {torch.float64: "f64", torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}


@dataclasses.dataclass
class Case:
    """One configuration of a block plus how to run it.

    kind: 'ms' (MultiScaleBlock / NaiveMultiScaleBlock) or 'psp' (PyramidPooling / NaivePyramidPooling).
    kwargs: the constructor's keyword arguments (besides in_channels, which is shape[1]).
    train: module mode; steps: forward passes in that mode (the last one with backward), which
        exercises the running statistics.
    norm_overrides: {branch index: nn.BatchNorm2d keyword arguments} replacing that branch's norm
        (momentum=None, affine=False, track_running_stats=False, eps=...).
    """

    kind: str
    kwargs: dict
    shape: Tuple[int, int, int, int]
    dtype: torch.dtype = torch.float64
    layout: str = "contiguous"
    train: bool = False
    steps: int = 1
    norm_overrides: Dict[int, dict] = dataclasses.field(default_factory=dict)
    label: str = ""

    def __post_init__(self):
        # Ill-conditioned float32 cases: a norm with batch statistics over very few values per channel
        # (M = N * h * w, e.g. bin 1 at N = 2 or 3). The normalised value divides the conv output's rounding
        # error by the standard deviation of those few values, which can be tiny, and at M = 2 the gradient
        # reaching the conv is O(eps / var) (the projection leaves nothing). Any float32 implementation then
        # misses 1e-5 now and then, the naive module included (up to ~1e-4 by the metric), independently of
        # the fused one. float32/bf16 cases therefore use a batch with M >= 8 there; float64 keeps the small
        # batches (it has the precision to spare, and they are tested there).
        if self.dtype != torch.float64 and self._batch_stat_branches():
            stat = self._batch_stat_branches()
            small = [h * w for i, (h, w) in enumerate(self.levels()) if i in stat]
            n = max([self.shape[0]] + [-(-8 // hw) for hw in small])
            self.shape = (n,) + tuple(self.shape[1:])
            # Likewise a conv with one input value per output (C = 1, k = 1) before a batch-statistics norm:
            # the norm is invariant to the weight's scale, so the weight's true gradient is O(eps) and float32
            # rounding dominates it. Those cases use C = 2.
            kernels = self._per_branch("kernel_size", 3 if self.kind == "ms" else 1)
            if self.shape[1] == 1 and any(k == 1 for i, k in enumerate(kernels) if i in stat):
                self.shape = (self.shape[0], 2) + tuple(self.shape[2:])

    def levels(self) -> List[Tuple[int, int]]:
        N, C, H, W = self.shape
        if self.kind == "ms":
            return [(H // s, W // s) for s in self.kwargs.get("scales", (1, 2, 4))]
        return [(b, b) if isinstance(b, int) else tuple(b) for b in self.kwargs.get("bins", (1, 2, 3, 6))]

    def _per_branch(self, name: str, default):
        v = self.kwargs.get(name, default)
        return list(v) if isinstance(v, (list, tuple)) else [v] * len(self.levels())

    def _batch_stat_branches(self) -> set:
        """Branches whose norm normalises with the batch's statistics."""
        norms = self._per_branch("norm", None if self.kind == "ms" else "batch")
        out = set()
        for i, n in enumerate(norms):
            over = self.norm_overrides.get(i)
            if over is not None:
                if self.train or over.get("track_running_stats") is False:
                    out.add(i)
            elif n == "batch" and self.train:
                out.add(i)
        return out

    @property
    def id(self) -> str:
        k = self.kwargs
        parts = [self.label] if self.label else []
        if self.kind == "ms":
            parts.append("ms" + "".join(map(str, k.get("scales", (1, 2, 4)))))
            parts.append("down=" + k.get("down_mode", "avg"))
        else:
            bins = k.get("bins", (1, 2, 3, 6))
            parts.append("psp" + ",".join(f"{b[0]}x{b[1]}" if isinstance(b, (tuple, list)) else str(b) for b in bins))
        parts.append("up=" + k.get("up_mode", "bilinear"))
        parts.append("ac" if k.get("align_corners", False) else "noac")
        parts.append("k" + _short(k.get("kernel_size", 3 if self.kind == "ms" else 1)))
        parts.append("act=" + str(k.get("activation", "relu")))
        parts.append("pos=" + str(k.get("input_position", "first")))
        norm = k.get("norm", None if self.kind == "ms" else "batch")
        parts.append("norm=" + _short(norm))
        if "bias" in k:
            parts.append("bias=" + _short(k["bias"]))
        if self.norm_overrides:
            parts.append("bn=" + ";".join(f"{i}:" + ",".join(f"{a}={v}" for a, v in kw.items())
                                          for i, kw in self.norm_overrides.items()))
        parts.append("train" if self.train else "eval")
        if self.steps > 1:
            parts.append(f"steps{self.steps}")
        parts.append("x".join(map(str, self.shape)))
        parts.append(self.layout)
        parts.append(_DTYPE_NAMES[self.dtype])
        return "-".join(parts)


def _short(v) -> str:
    if isinstance(v, (list, tuple)):
        return "(" + ",".join(_short(e) for e in v) + ")"
    if v is True:
        return "T"
    if v is False:
        return "F"
    return str(v)


def case_ids(cases: Sequence[Case]) -> List[str]:
    return [c.id for c in cases]


# ---------------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------------

NAIVE = {"ms": msfused.NaiveMultiScaleBlock, "psp": msfused.NaivePyramidPooling}
FUSED = {"ms": msfused.MultiScaleBlock, "psp": msfused.PyramidPooling}


def randomize_(module: nn.Module) -> nn.Module:
    """Non-trivial random state: conv weights and biases, BatchNorm affine parameters and running
    statistics (and a count, so that momentum=None's cumulative average is not a plain copy)."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.normal_(0.0, 1.5 / fan_in**0.5)
                if m.bias is not None:
                    m.bias.normal_(0.0, 0.5)
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):  # BatchNorm2d, SyncBatchNorm, _BatchNormXd
                if m.weight is not None:
                    m.weight.normal_(1.0, 0.3)
                    m.bias.normal_(0.0, 0.3)
                if m.running_mean is not None:
                    m.running_mean.normal_(0.0, 0.4)
                    m.running_var.uniform_(0.5, 2.0)
                if m.num_batches_tracked is not None:
                    m.num_batches_tracked.fill_(int(torch.randint(1, 6, ())))
    return module


def _apply_norm_overrides(block: nn.Module, overrides: Dict[int, dict]) -> None:
    for i, kw in overrides.items():
        cb = block.branches[i].conv.out_channels
        block.branches[i].norm = nn.BatchNorm2d(cb, **kw)


def build_pair(kind: str, in_channels: int, kwargs: dict, dtype: torch.dtype = torch.float64,
               norm_overrides: Optional[Dict[int, dict]] = None) -> Tuple[nn.Module, nn.Module]:
    """(naive, fused) of the same configuration with identical random parameters and buffers; the fused
    one gets them through ``load_state_dict`` (the public path)."""
    kwargs = dict(kwargs)
    kwargs.setdefault("branch_channels", 3)
    naive = NAIVE[kind](in_channels, **kwargs)
    fused = FUSED[kind](in_channels, **kwargs)
    if norm_overrides:
        _apply_norm_overrides(naive, norm_overrides)
        _apply_norm_overrides(fused, norm_overrides)
    randomize_(naive)
    fused.load_state_dict(naive.state_dict())
    return naive.to(dtype), fused.to(dtype)


def build_case(case: Case) -> Tuple[nn.Module, nn.Module]:
    naive, fused = build_pair(case.kind, case.shape[1], case.kwargs, case.dtype, case.norm_overrides)
    naive.train(case.train)
    fused.train(case.train)
    return naive, fused


def reference64(naive: nn.Module) -> nn.Module:
    """The float64 reference: a copy of the naive module in float64 (same values)."""
    return copy.deepcopy(naive).to(torch.float64)


# ---------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------


def make_input(shape: Sequence[int], dtype: torch.dtype = torch.float64, layout: str = "contiguous",
               requires_grad: bool = False, device: str = "cpu") -> torch.Tensor:
    """Fresh random ``x`` of ``shape`` in ``layout``: 'contiguous', 'channels_last', 'slice_h'
    (``base[:, :, 1:-1]``), 'transposed' (``base.transpose(2, 3)``), 'channels_last_slice' (a width slice
    of a channels_last tensor), 'batch_strided' (``base[::2]``), 'channel_slice' (``base[:, 1:-1]``).
    With ``requires_grad`` the *base* is a leaf and the returned view is part of the graph."""
    N, C, H, W = shape

    def rand(*s, fmt=torch.contiguous_format):
        t = torch.randn(*s, dtype=torch.float64)
        t = torch.where(t == 0, torch.ones_like(t), t)  # never an exact zero
        return t.to(device=device, dtype=dtype).contiguous(memory_format=fmt)

    if layout == "contiguous":
        base = rand(N, C, H, W)
        view = lambda b: b  # noqa: E731
    elif layout == "channels_last":
        base = rand(N, C, H, W, fmt=torch.channels_last)
        view = lambda b: b  # noqa: E731
    elif layout == "slice_h":
        base = rand(N, C, H + 2, W)
        view = lambda b: b[:, :, 1:-1]  # noqa: E731
    elif layout == "transposed":
        base = rand(N, C, W, H)
        view = lambda b: b.transpose(2, 3)  # noqa: E731
    elif layout == "channels_last_slice":
        base = rand(N, C, H, W + 3, fmt=torch.channels_last)
        view = lambda b: b[:, :, :, 1:-2]  # noqa: E731
    elif layout == "batch_strided":
        base = rand(2 * N, C, H, W)
        view = lambda b: b[::2]  # noqa: E731
    elif layout == "channel_slice":
        base = rand(N, C + 2, H, W)
        view = lambda b: b[:, 1:-1]  # noqa: E731
    else:
        raise ValueError(layout)
    if requires_grad:
        base.requires_grad_(True)
    x = view(base)
    assert tuple(x.shape) == tuple(shape)
    return x


def suggests_channels_last(x: torch.Tensor) -> bool:
    return torch._prims_common.suggest_memory_format(x) == torch.channels_last


def assert_memory_format(out: torch.Tensor, x: torch.Tensor, context: str = "") -> None:
    """SPEC.md: channels_last exactly when ``x.suggest_memory_format()`` is, contiguous otherwise."""
    if suggests_channels_last(x):
        assert out.is_contiguous(memory_format=torch.channels_last), (
            f"{context}: x suggests channels_last but the output has strides {out.stride()}")
    else:
        assert out.is_contiguous(), f"{context}: x suggests contiguous but the output has strides {out.stride()}"


class Checker:
    """Applies SPEC.md's metric to one tensor at a time and explains a failure.

    float64: ``err <= 1e-10``. float32 (against the float64 reference): ``err <= 1e-5``. Where that fails
    for a tensor whose float32 value is ill-conditioned (a gradient that is a cancelling sum: a norm weight
    or a bin-1 weight whose gradient happens to be near 0, a norm over few values), no float32
    implementation meets 1e-5, the naive module included. The fused value must then be no worse than the
    naive composition run in float32 on the same values, measured twice (contiguous and channels_last
    input: two rounding orders) with a margin for the randomness of rounding noise:
    ``err <= 4 · max(err_naive_f32) + 1e-5``, or within ``F32_SENSITIVITY_FACTOR`` times the tensor's
    sensitivity to float32 rounding of the inputs (``sens``: the float64 reference's change under one
    rounding of x, the parameters and the upstream gradient, a number or a function that measures it;
    msfused.bench.accuracy says why). Every failure message reports the numbers."""

    def __init__(self, dtype: torch.dtype, context: str, tol: Optional[float] = None):
        self.dtype = dtype
        self.tol = TOL[dtype] if tol is None else tol
        self.context = context

    def __call__(self, name: str, out: torch.Tensor, ref: torch.Tensor, own=None,
                 s: Optional[float] = None, zero_probe: Optional["ZeroGradProbe"] = None,
                 zero_index: Optional[int] = None, sens=None) -> None:
        e = norm_err(out, ref, s)
        if e <= self.tol:
            return
        owns = [] if own is None else [own] if isinstance(own, torch.Tensor) else [o for o in own if o is not None]
        e_own = max((norm_err(o, ref, s) for o in owns), default=float("nan"))
        if zero_probe is not None and zero_index is not None:
            # True value zero, or nearly (a scalar weight): within the rounding bound (see ZeroGradProbe)?
            assert zero_probe.within(zero_index, out, self.tol, s, ref), (
                f"{self.context}: {name} (true value ~0): |grad| {out.detach().abs().tolist()} exceeds the rounding "
                f"bound {zero_probe.bound(zero_index, out.dtype).tolist()} (SPEC err {e:.3e}, naive in "
                f"{self.dtype}: {e_own:.3e})")
            return
        if self.dtype == torch.float32 and owns and within_spec(e, self.dtype, e_own):
            return
        if self.dtype == torch.float32 and sens is not None:
            sens = sens() if callable(sens) else sens  # (measured only now: most tensors never need it)
            if e <= F32_SENSITIVITY_FACTOR * sens:
                return
        raise AssertionError(f"{self.context}: {name}: err {e:.3e} > tol {self.tol:.1e} "
                             f"(the naive module in {self.dtype}: err {e_own:.3e}; sensitivity to float32 "
                             f"rounding: {sens if sens is None else format(sens, '.2e')})")


# ---------------------------------------------------------------------------------------------------
# The core comparison
# ---------------------------------------------------------------------------------------------------


def perturb_rounding(t: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``t`` (float64) with each element moved by one float32 rounding, relative 2^-24, random sign."""
    gen = generator or torch.Generator().manual_seed(2024)
    sign = torch.randint(0, 2, t.shape, generator=gen, dtype=torch.float64) * 2 - 1
    return t * (1 + sign.to(t.device) * 2.0 ** -24)


def rounding_perturbed(ref: nn.Module) -> nn.Module:
    """A copy of the float64 reference whose parameters are each moved by one float32 rounding (norm
    buffers as they are), and whose convolutions' outputs and output gradients are too (hooks): those are
    intermediates every float32 implementation stores, the naive module and the fused one alike, only in
    different places. Under a batch-statistics norm a map's gradient sums to zero, and a branch whose level
    covers most of the map then takes its gradient as a cancelling sum of it (seed 502's Triton projection
    case: the float32 naive module 1.3e-4 off on other draws, its err on that draw 5.7e-6 by chance): the
    rounding of that stored gradient decides the error, and rounding the inputs alone does not show it."""
    copy_ = copy.deepcopy(ref)
    gen = torch.Generator().manual_seed(2025)
    with torch.no_grad():
        for p in copy_.parameters():
            p.copy_(perturb_rounding(p, gen))
    inner = torch.Generator().manual_seed(2026)
    for m in copy_.modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_hook(lambda _m, _args, out: perturb_rounding(out, inner))
            m.register_full_backward_pre_hook(lambda _m, grad_out: (perturb_rounding(grad_out[0], inner),))
    return copy_


def run_fused_vs_reference(naive: nn.Module, fused: nn.Module, shape: Sequence[int], dtype: torch.dtype,
                           layout: str = "contiguous", steps: int = 1, grads: bool = True, context: str = "",
                           tol: Optional[float] = None, x_requires_grad: bool = True, device: str = "cpu") -> None:
    """Runs ``fused`` (default backend) and a float64 copy of ``naive`` (same values) on the same fresh
    inputs ``steps`` times (the last with backward) and checks, with SPEC.md's metric (``Checker``):
    the output (values, dtype, shape, memory format, no NaN), the gradients of x and of every parameter,
    every buffer afterwards (running statistics; num_batches_tracked exactly), and that neither x nor any
    parameter was modified. For float32 the naive module also runs in float32 (``Checker``'s fallback).
    ``device``: where ``fused`` and its input live (moved there); the references always run on the CPU."""
    check = Checker(dtype, context, tol)
    fused.to(device)
    ref = reference64(naive)
    own = copy.deepcopy(naive) if dtype == torch.float32 else None
    for m in (ref, own):
        if m is not None:
            m.train(fused.training)
    for _ in range(steps - 1):
        xs = make_input(shape, dtype, layout, device=device)
        with torch.no_grad():
            fused(xs)
            xs = xs.cpu()
            ref(xs.to(torch.float64))
            if own is not None:
                own(xs)
    x_grad = grads and x_requires_grad
    x = make_input(shape, dtype, layout, requires_grad=x_grad, device=device)
    x_before = x.detach().clone()
    params = dict(fused.named_parameters())
    ref_params = dict(ref.named_parameters())
    assert params.keys() == ref_params.keys()
    names = list(params)
    params_before = {k: v.detach().clone() for k, v in params.items()}
    x64 = x.detach().to(device="cpu", dtype=torch.float64).requires_grad_(x_grad)
    x_own = x.detach().cpu().clone().requires_grad_(x_grad)
    # A second float32 run of the naive module in the other memory format (another rounding order).
    own_alt = copy.deepcopy(own) if own is not None else None
    alt_format = torch.contiguous_format if suggests_channels_last(x) else torch.channels_last
    x_alt = x.detach().cpu().contiguous(memory_format=alt_format).requires_grad_(x_grad)
    probe = ZeroGradProbe(ref) if grads else None
    # float32: the reference once more on inputs perturbed by one float32 rounding (Checker's `sens`).
    ref_p = rounding_perturbed(ref) if dtype == torch.float32 else None
    try:
        out = fused(x)
        out_ref = ref(x64)
        out_own = own(x_own) if own is not None else None
        out_alt = own_alt(x_alt) if own_alt is not None else None
        assert out.dtype == dtype, f"{context}: output dtype {out.dtype}, expected {dtype}"
        assert out.shape == out_ref.shape == (shape[0], fused.out_channels, shape[2], shape[3]), context
        assert_memory_format(out, x, context)
        assert not torch.isnan(out).any(), f"{context}: NaN in the output for a finite input"
        # Run only when a tensor misses 1e-5 (Checker calls it): one forward and backward, for every tensor.
        memo, ref_grads = {}, {}

        def sens(name):
            if ref_p is None:
                return None

            def measure():
                if "output" not in memo:
                    memo["x_p"] = perturb_rounding(x64.detach()).requires_grad_(x_grad)
                    memo["out_p"] = ref_p(memo["x_p"])
                    memo["output"] = norm_err(memo["out_p"], out_ref)
                if name not in memo:
                    wrt = (["grad x"] if x_grad else []) + [f"grad {n}" for n in names]
                    p_params = dict(ref_p.named_parameters())
                    moved = torch.autograd.grad(memo["out_p"], ([memo["x_p"]] if x_grad else []) +
                                                [p_params[n] for n in names], perturb_rounding(g.double()))
                    memo.update((k, norm_err(a, ref_grads[k], s)) for k, a in zip(wrt, moved))
                return memo[name]
            return measure

        check("output", out, out_ref, (out_own, out_alt), sens=sens("output"))
        if grads:
            g = torch.randn(out.shape, dtype=torch.float64).to(dtype)
            s = g.double().norm().item()
            xs = ([x], [x64], [x_own], [x_alt]) if x_grad else ([], [], [], [])
            got = torch.autograd.grad(out, xs[0] + [params[n] for n in names], g.to(out.device))
            want = torch.autograd.grad(out_ref, xs[1] + [ref_params[n] for n in names], g.double())
            ref_grads.update(zip((["grad x"] if x_grad else []) + [f"grad {n}" for n in names], want))
            if own is not None:
                own_params, alt_params = dict(own.named_parameters()), dict(own_alt.named_parameters())
                mine = list(zip(torch.autograd.grad(out_own, xs[2] + [own_params[n] for n in names], g),
                                torch.autograd.grad(out_alt, xs[3] + [alt_params[n] for n in names], g)))
            else:
                mine = [None] * len(got)
            if x_grad:
                assert got[0].shape == x.shape
                check("grad x", got[0], want[0], mine[0], s, sens=sens("grad x"))
                got, want, mine = got[1:], want[1:], mine[1:]
            zero = probe.param_names()
            for n, a, b, c in zip(names, got, want, mine):
                assert a is not None and a.shape == params[n].shape, f"{context}: grad {n} missing or misshaped"
                assert a.dtype == params[n].dtype, f"{context}: grad {n} dtype {a.dtype}"
                check(f"grad {n}", a, b, c, s, probe if n in zero else None, zero.get(n), sens(f"grad {n}"))
    finally:
        if probe is not None:
            probe.remove()
    # Buffers: running statistics after the train steps (and unchanged in eval mode).
    ref_buffers = dict(ref.named_buffers())
    own_buffers = dict(own.named_buffers()) if own is not None else {}
    alt_buffers = dict(own_alt.named_buffers()) if own_alt is not None else {}
    for n, buf in fused.named_buffers():
        want = ref_buffers[n]
        if n.endswith("num_batches_tracked"):
            assert torch.equal(buf.cpu(), want), f"{context}: {n} = {buf.item()}, reference {want.item()}"
        else:
            assert buf.dtype == dtype, f"{context}: {n} dtype {buf.dtype}"
            check(n, buf, want, (own_buffers.get(n), alt_buffers.get(n)))
    # Inputs never modified.
    assert torch.equal(x.detach(), x_before), f"{context}: x was modified"
    for n, p in params.items():
        assert torch.equal(p.detach(), params_before[n]), f"{context}: parameter {n} was modified"


def run_case(case: Case, grads: bool = True, x_requires_grad: bool = True, device: str = "cpu") -> None:
    naive, fused = build_case(case)
    run_fused_vs_reference(naive, fused, case.shape, case.dtype, case.layout, case.steps, grads, context=case.id,
                           x_requires_grad=x_requires_grad, device=device)


# Draws per half-precision check where they are cheap (the CPU kernels, a GPU). With 8, c19's projection case
# (tests/test_projection.py) failed the rule on 2 of 200 seeds on the CPU kernels (its 2-channel branch biases,
# a sum of 12 level values each, whose error is heavy-tailed) although their mean error over 400 draws is
# 0.84-1.00x the naive module's; resampled from 800 draws, 3 of 4000 sets of 8 failed, none of 16, 24 or 32.
HALF_PRECISION_TRIALS = 24


def check_half_precision_grads(case: Case, trials: int = HALF_PRECISION_TRIALS, device: str = "cpu") -> None:
    """SPEC.md's half-precision rule for the output and every gradient (x and each parameter), applied to
    the mean err over ``trials`` fresh draws (one draw of a bf16 error is noisy: one rounding more or less):
    mean err_fused <= 2 x mean err_naive + 1e-3 per tensor, the naive module running in the same dtype on
    the CPU, both against the float64 reference. Gradients whose true value is 0 (conv biases before batch
    statistics) are left to the float32 / float64 checks.

    Use 8 trials or more (HALF_PRECISION_TRIALS where draws are cheap): one draw's error is heavy-tailed (a
    near-cancelling sum rounds far off), and with 4 the mean of a draw set where the naive module happened to be
    lucky failed the rule for about 1% of seeds (test_triton_projection_statistics_bfloat16's case over 480
    draws on the CPU kernels, whose error averages 0.64x the naive module's; none of 2000 resampled sets of 8
    failed)."""
    sums: Dict[str, List[float]] = {}
    for _ in range(trials):
        naive, fused = build_case(case)
        fused.to(device)
        ref = reference64(naive)
        x = make_input(case.shape, case.dtype, case.layout)
        xs = [x.to(device).requires_grad_(True), x.clone().requires_grad_(True), x.double().requires_grad_(True)]
        mods = (fused, naive, ref)
        outs = [m(v) for m, v in zip(mods, xs)]
        assert outs[0].dtype == case.dtype
        assert_memory_format(outs[0], xs[0], case.id)
        g = torch.randn(outs[0].shape, dtype=torch.float64).to(case.dtype)
        s = g.double().norm().item()
        names = ["output", "x"] + [n for n, _ in fused.named_parameters()]
        grads = [torch.autograd.grad(o, [v] + list(m.parameters()), g.to(o.device, o.dtype))
                 for m, o, v in zip(mods, outs, xs)]
        zero = true_zero_gradients(fused)
        for i, n in enumerate(names):
            if n in zero:
                continue
            if i == 0:
                e = (norm_err(outs[0], outs[2]), norm_err(outs[1], outs[2]))
            else:
                assert grads[0][i - 1].dtype == case.dtype
                e = (norm_err(grads[0][i - 1], grads[2][i - 1], s), norm_err(grads[1][i - 1], grads[2][i - 1], s))
            acc = sums.setdefault(n, [0.0, 0.0])
            acc[0] += e[0] / trials
            acc[1] += e[1] / trials
    bad = {n: (f, o) for n, (f, o) in sums.items() if not f <= half_precision_limit(o)}
    assert not bad, f"{case.id}: mean err (fused, naive) over the limit: " + ", ".join(
        f"{n}: {f:.2e} > 2 x {o:.2e} + 1e-3" for n, (f, o) in bad.items())


@pytest.fixture
def spies(monkeypatch):
    """Counts the calls of the fused operator's entry and of the reference composition (MSFUSED_BACKEND unset)."""
    import msfused.functional as functional

    calls = {"fused": 0, "reference": 0}
    fused_forward, reference_forward = functional._fused_forward, functional.reference_forward

    def fused_spy(*a, **k):
        calls["fused"] += 1
        return fused_forward(*a, **k)

    def reference_spy(*a, **k):
        calls["reference"] += 1
        return reference_forward(*a, **k)

    monkeypatch.setattr(functional, "_fused_forward", fused_spy)
    monkeypatch.setattr(functional, "reference_forward", reference_spy)
    monkeypatch.delenv("MSFUSED_BACKEND", raising=False)
    return calls


class OpNames(TorchDispatchMode):
    """Records the name of every ATen (or custom) operator run under it, in order (``names``)."""

    def __init__(self):
        super().__init__()
        self.names: List[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))
