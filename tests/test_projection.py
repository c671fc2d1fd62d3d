"""The block with its projection (SPEC.md, "The projection"; issue 14): the fused CPU operator against the
naive composition (the concatenation built, then convolved) over a sampled grid of the contract, float64
and float32, gradients of x and of every parameter, running statistics; gradcheck; opcheck; NaN-poisoned
buffers; bad input; convert's folding; and that the concatenation never exists in the fused forward and
backward (a dispatch mode watching every tensor allocated)."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import msfused

from .conftest import Case, build_case, build_pair, check_half_precision_grads, make_input, run_case

FORWARD = torch.ops.msfused.multi_scale_project_forward.default
BACKWARD = torch.ops.msfused.multi_scale_project_backward.default


def _proj(P=5, k=1, bias=False, norm="batch", activation="relu"):
    return dict(out_channels=P, kernel_size=k, bias=bias, norm=norm, activation=activation)


def _grid() -> list:
    """A sample of the contract's grid with a projection: every value of every axis appears (projection k
    1 and 3, bias, norm none / eval / train, every activation, every input position, factor pyramids with
    a factor-1 and a factor-2 level (convolved directly) and smaller ones (per tap), bins blocks, odd sizes,
    NCHW and channels_last, float64 and float32). Pairs of axes are drawn with a fixed seed, so the sample
    is the same on every run."""
    rng = random.Random(14)
    blocks = [
        ("ms", dict(scales=(1, 2, 4), down_mode="avg"), (2, 3, 11, 9)),
        ("ms", dict(scales=(2, 3), down_mode="bilinear", align_corners=True, kernel_size=1, norm="batch"), (2, 4, 9, 13)),
        ("ms", dict(scales=(4, 1), down_mode="nearest", up_mode="nearest", bias=False), (2, 3, 10, 7)),
        ("psp", dict(bins=(1, 2, 3, 6)), (2, 5, 13, 11)),
        ("psp", dict(bins=((2, 5), 3), kernel_size=3, up_mode="nearest", norm=None, bias=True), (3, 3, 7, 9)),
        ("psp", dict(bins=(1, 2, 3, 6), bias=(True, False, False, False), norm=(None, "batch", "batch", "batch"),
                     align_corners=True), (2, 4, 12, 10)),
    ]
    axes = dict(k=(1, 3), bias=(False, True), norm=("none", "eval", "train"), act=("relu", "silu", "gelu", None),
                pos=("first", "last", None), layout=("contiguous", "channels_last"),
                dtype=(torch.float64, torch.float32), block_act=("relu", "gelu", None))
    cases = []
    for i in range(12):
        kind, kw, shape = blocks[i % len(blocks)]
        pick = {a: vals[(i + rng.randrange(len(vals))) % len(vals)] for a, vals in axes.items()}
        # Biases before a batch-statistics norm (the projection's; a branch's reaching it through the 1x1 conv
        # where the branch's activation is open or linear) have a true gradient of 0: conftest.ZeroGradProbe
        # checks them against their rounding bound.
        train = pick["norm"] == "train"
        kwargs = dict(kw, activation=pick["block_act"], input_position=pick["pos"], branch_channels=3,
                      project=_proj(P=5 + i % 3, k=pick["k"], bias=pick["bias"],
                                    norm=None if pick["norm"] == "none" else "batch", activation=pick["act"]))
        if train and kind == "ms":
            kwargs.setdefault("norm", "batch")
        cases.append(Case(kind, kwargs, shape, dtype=pick["dtype"], layout=pick["layout"], train=train,
                          steps=2 if train else 1, label=f"proj{pick['k']}-{pick['norm']}-{pick['act']}-"
                          f"{'pb' if pick['bias'] else 'nopb'}"))
    # Axes the random draw must not miss: k = 3 over a factor-2 level (convolved directly) in training,
    # and every activation with k = 3.
    cases.append(Case("ms", dict(scales=(1, 2, 3), norm="batch", bias=False, branch_channels=2,
                                 project=_proj(P=4, k=3, activation="silu")), (2, 3, 9, 11), train=True, steps=2,
                      layout="channels_last", label="proj3-train-direct"))
    for act in ("relu", "gelu", None):
        cases.append(Case("psp", dict(bins=(1, 3), input_position="last", project=_proj(P=6, k=3, norm=None, bias=True,
                                                                                     activation=act)),
                          (2, 4, 8, 7), label=f"proj3-act={act}"))
    return cases


GRID = _grid()


@pytest.mark.parametrize("case", GRID, ids=[c.id for c in GRID])
def test_matches_naive(case):
    """Output, gradients of x and of every parameter (branches and projection), running statistics (after
    two training steps), inputs unmodified: float64 <= 1e-10, float32 <= 1e-5 against float64."""
    run_case(case)


def _small_block(kind="ms", train=True, layout_cl=False):
    if kind == "ms":
        naive, fused = build_pair("ms", 2, dict(scales=(1, 2, 3), norm="batch", bias=False, branch_channels=2,
                                                 project=_proj(P=3, k=3, norm="batch", activation="gelu")))
        shape = (2, 2, 7, 6)
    else:
        naive, fused = build_pair("psp", 2, dict(bins=(1, 2, 4), branch_channels=2, input_position="last",
                                                  project=_proj(P=3, k=3, bias=True, norm=None, activation="silu")))
        shape = (2, 2, 6, 5)
    fused.train(train)
    naive.train(train)
    return naive, fused, shape


@pytest.mark.parametrize("kind", ["ms", "psp"])
def test_gradcheck(kind):
    """torch.autograd.gradcheck through the fused operator (float64), x and every parameter."""
    _, fused, shape = _small_block(kind, train=(kind == "ms"))
    x = make_input(shape, torch.float64, "channels_last" if kind == "psp" else "contiguous", requires_grad=True)
    params = list(fused.parameters())
    names = [n for n, _ in fused.named_parameters()]

    def f(x, *ps):
        state = {n: p for n, p in zip(names, ps)}
        return torch.func.functional_call(fused, state, (x,))

    # fast_mode: the Jacobian checked along random directions (the full one is minutes on 2 cores).
    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-7, rtol=1e-6, fast_mode=True)


class _WatchAllocations(TorchDispatchMode):
    """Records the shape of every tensor an operator returns (every tensor allocated under the mode)."""

    def __init__(self):
        super().__init__()
        self.shapes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.shapes.add(tuple(t.shape))
        return out


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_the_concatenation_never_exists(train):
    """No tensor of the concatenation's shape (N, C_out, H, W) is allocated in the fused forward and backward
    (the C++ operator's own allocations are invisible to a Python mode, so the mode also watches ATen's
    ops that the operator dispatches: it is registered over the whole call); the naive module does
    allocate it, which shows the watch works."""
    naive, fused = build_pair("psp", 6, dict(bins=(1, 2, 3, 6), branch_channels=4, project=_proj(P=5, k=3)),
                              torch.float32)
    naive.train(train)
    fused.train(train)
    x = make_input((2, 6, 12, 10), torch.float32, requires_grad=True)
    cat_shape = (2, fused.spec.concat_channels, 12, 10)
    with _WatchAllocations() as naive_watch:
        naive(x).sum().backward()
    assert cat_shape in naive_watch.shapes
    with _WatchAllocations() as watch:
        fused(x).sum().backward()
    assert cat_shape not in watch.shapes, f"the fused block allocated a {cat_shape} tensor"
    assert (2, 5, 12, 10) in watch.shapes  # the output itself is seen


def test_cpp_operator_never_allocates_the_concatenation():
    """The same inside the C++ operator: its internal allocations go through ATen's dispatcher only when
    called from Python, so here the concatenation's element count is checked against CPU memory peaks:
    the operator's peak allocation stays below the size of one concatenation."""
    _, fused = build_pair("psp", 64, dict(bins=(1, 2, 3, 6), branch_channels=64, project=_proj(P=8, k=3)),
                          torch.float32)
    fused.eval()
    x = make_input((1, 64, 48, 48), torch.float32)
    cat_bytes = fused.spec.concat_channels * 48 * 48 * 4
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with torch.no_grad():
            fused(x)
    biggest = max((abs(e.cpu_memory_usage) for e in prof.events() if e.cpu_memory_usage > 0), default=0)
    assert 0 < biggest < cat_bytes, f"an allocation of {biggest} bytes (the concatenation: {cat_bytes})"


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_nan_poisoned_buffers_and_deterministic_mode(train):
    """Under torch.use_deterministic_algorithms(True) ATen fills every uninitialised tensor with NaN, the
    kernels' outputs and scratch buffers included: an element the kernels forget to write shows. The
    results match the naive module's and repeat bit for bit."""
    naive, fused, shape = _small_block("ms", train)
    ref = copy.deepcopy(naive)
    x = make_input(shape, torch.float64, requires_grad=True)
    before = torch.are_deterministic_algorithms_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        runs = []
        for _ in range(2):
            f = copy.deepcopy(fused)
            out = f(x)
            g = torch.autograd.grad(out, [x, *f.parameters()], torch.ones_like(out))
            runs.append((out, g))
    finally:
        torch.use_deterministic_algorithms(before)
        torch.utils.deterministic.fill_uninitialized_memory = fill
    out_ref = ref(x)
    g_ref = torch.autograd.grad(out_ref, [x, *ref.parameters()], torch.ones_like(out_ref))
    (out, g), (out2, g2) = runs
    assert not torch.isnan(out).any() and all(not torch.isnan(t).any() for t in g)
    assert torch.equal(out, out2) and all(torch.equal(a, b) for a, b in zip(g, g2))
    assert (out - out_ref).norm() <= 1e-10 * out_ref.norm()
    for a, b in zip(g, g_ref):
        assert (a - b).norm() <= 1e-10 * max(b.norm(), 1e-6 * out_ref.numel() ** 0.5)


def _op_arguments(block, x, requires_grad):
    from msfused.functional import _branch_args, _norm_epilogue

    leaf = lambda t: None if t is None else t.detach().clone().requires_grad_(requires_grad)  # noqa: E731
    weight, bias, scale, shift, batch_stats, eps = _branch_args(x, block.spec, block.branches)
    p_bias, p_scale, p_shift, p_stats, p_eps = _norm_epilogue(block.project.conv, block.project.norm)
    x = x.detach().clone(memory_format=torch.preserve_format).requires_grad_(requires_grad)
    lists = [[leaf(t) for t in ts] for ts in (weight, bias, scale, shift)]
    args = (x, *lists, batch_stats, eps)
    kwargs = dict(block.spec.op_args(), project_weight=leaf(block.project.conv.weight),
                  project_bias=leaf(p_bias), project_scale=leaf(p_scale), project_shift=leaf(p_shift),
                  project_batch_stats=p_stats, project_eps=p_eps, **block.spec.project.op_args(), save_pre=True)
    return args, kwargs


OP_CASES = [
    Case("ms", dict(scales=(1, 2, 3), norm="batch", bias=False, project=_proj(P=3, k=3, activation="gelu")),
         (2, 3, 9, 7), train=True, label="op"),
    Case("psp", dict(bins=(1, 2, 3), input_position="last", project=_proj(P=4, k=1, bias=True, norm=None)),
         (2, 3, 8, 9), layout="channels_last", label="op"),
    Case("ms", dict(scales=(2, 4), input_position=None, project=_proj(P=3, k=3, activation=None)), (2, 3, 9, 8),
         dtype=torch.float32, label="op"),
]


@pytest.mark.parametrize("case", OP_CASES, ids=[c.id for c in OP_CASES])
def test_opcheck(case):
    """torch.library.opcheck on the forward (with and without gradients) and the backward operators."""
    _, fused = build_case(case)
    x = make_input(case.shape, case.dtype, case.layout)
    for requires_grad in (True, False):
        args, kwargs = _op_arguments(fused, x, requires_grad)
        torch.library.opcheck(FORWARD, args, kwargs)
        # Without keeping the pre-activation (inference): the same output, computed in its place.
        out = FORWARD(*args, **kwargs)[0]
        kwargs["save_pre"] = False
        lean = FORWARD(*args, **kwargs)
        assert lean[5].numel() == 0 and torch.equal(lean[0], out)
        if not requires_grad:
            torch.library.opcheck(FORWARD, args, kwargs)
    args, kwargs = _op_arguments(fused, x, False)
    out, level, pre, mean, var, p_pre, p_mean, p_var = FORWARD(*args, **kwargs)
    x, weight, _bias, scale, shift, batch_stats, eps = args
    for mask in ([True, True], [False, True], [True, False]):
        bargs = (torch.randn_like(out), x, weight, scale, shift, level, pre, mean, var, batch_stats, eps)
        bkw = {k: v for k, v in kwargs.items() if k not in ("project_bias", "save_pre")}
        bkw.update(project_pre=p_pre, project_mean=p_mean, project_var=p_var, output_mask=mask)
        torch.library.opcheck(BACKWARD, bargs, bkw)


def test_compile_one_operator_node_and_export():
    """torch.compile(fullgraph=True) gives the eager numbers with one call of the fused operator in the
    graph; torch.export keeps the operator too."""
    _, fused, shape = _small_block("psp", train=False)
    x = make_input(shape, torch.float64)
    want = fused(x)
    graphs = []

    def backend(gm, inputs):
        graphs.append(gm)
        return gm.forward

    got = torch.compile(fused, fullgraph=True, backend=backend)(x)
    assert torch.allclose(got, want, rtol=0, atol=1e-12)
    calls = [n for g in graphs for n in g.graph.nodes if n.op == "call_function" and "msfused" in str(n.target)]
    assert len(calls) == 1 and "multi_scale_project_forward" in str(calls[0].target)
    ep = torch.export.export(fused, (x,))
    assert any("multi_scale_project_forward" in str(n.target) for n in ep.graph.nodes)
    assert torch.allclose(ep.module()(x), want, rtol=0, atol=1e-12)


BF16_CASES = [
    Case("ms", dict(scales=(1, 2, 4), norm="batch", activation="gelu", branch_channels=4,
                    project=_proj(P=6, k=3, norm="batch", activation="silu")), (3, 5, 13, 11), torch.bfloat16,
         train=True, label="proj3-bf16-train"),
    Case("psp", dict(bins=(1, 2, 3, 6), activation="silu", branch_channels=4, input_position="last",
                     project=_proj(P=5, k=1, bias=True, norm=None, activation="gelu")), (3, 6, 12, 10),
         torch.bfloat16, layout="channels_last", label="proj1-bf16"),
]


@pytest.mark.parametrize("case", BF16_CASES, ids=[c.id for c in BF16_CASES])
def test_bfloat16_gradients(case):
    """bfloat16 (not under autocast: x and every parameter in bfloat16) with a projection: the output and the
    gradients of x and every parameter within SPEC.md's half-precision rule, on the mean err over 8 fresh
    draws (conftest.check_half_precision_grads; smooth activations: a ReLU kink flipped by one bf16 rounding is
    a large error for any implementation)."""
    check_half_precision_grads(case, trials=8)


def test_autocast_output_dtype():
    """Under CPU autocast (bfloat16) the output has the projection convolution's autocast dtype, as the
    naive module's, within SPEC.md's half-precision rule."""
    naive, fused, shape = _small_block("ms", train=False)
    naive.float()
    fused.float()
    x = make_input(shape, torch.float32)
    ref = copy.deepcopy(naive).double()(x.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fused(x)
        out_naive = naive(x)
    assert out.dtype == out_naive.dtype == torch.bfloat16
    err = lambda a: ((a.double() - ref).norm() / ref.norm()).item()  # noqa: E731
    assert err(out) <= 2 * err(out_naive) + 1e-3


def test_every_fused_backend_takes_a_projection():
    """'cpu', 'cuda' and 'triton' fuse a projection (the CUDA kernels: tests/test_cuda_emulation.py without a
    GPU, tests/test_cuda_backend.py on one; Triton: below, in its interpreter)."""
    from msfused import backends

    spec = msfused.PyramidPooling(4, 2, project=_proj(P=3)).spec
    for name in ("cpu", "cuda", "triton"):
        assert backends.projection_reason(name, spec) is None


# The Triton backend (in its interpreter on CPU; slow, so a few small cases that together cover k 1 and 3,
# bins and factor blocks, per-tap and direct parts, norm none / eval / train, NCHW and channels_last,
# float64 and float32). Every buffer a Triton kernel fills starts as NaN (launch.POISON).
TRITON_CASES = [
    Case("ms", dict(scales=(1, 2, 4), norm="batch", bias=False, branch_channels=2, activation="gelu",
                    project=_proj(P=3, k=3, activation="silu")), (2, 3, 11, 9), train=True, steps=2,
         layout="channels_last", label="proj3-train-direct"),
    Case("psp", dict(bins=(1, 2, 3), input_position="last", branch_channels=3,
                     project=_proj(P=4, k=1, bias=True, norm=None, activation="gelu")), (2, 3, 8, 9),
         dtype=torch.float32, label="proj1-none"),
    Case("psp", dict(bins=((2, 5), 3), kernel_size=3, up_mode="nearest", norm=None, bias=True, branch_channels=2,
                     project=_proj(P=3, k=3, bias=True, activation=None)), (2, 3, 7, 9), layout="channels_last",
         label="proj3-eval"),
    Case("ms", dict(scales=(2, 3), down_mode="bilinear", align_corners=True, input_position=None, branch_channels=2,
                    norm="batch", project=_proj(P=3, k=3)), (2, 3, 9, 13), dtype=torch.float32, train=True,
         label="proj3-train-pertap"),
]


@pytest.fixture
def _triton(monkeypatch):
    ok, why = msfused.availability("triton")
    if not ok:
        pytest.skip(f"Triton backend unavailable: {why}")
    from msfused.triton import launch

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # SPEC.md's float32 tolerance: TF32 off
    monkeypatch.setattr(launch, "POISON", True)
    with msfused.use_backend("triton"):
        yield "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("case", TRITON_CASES, ids=[c.id for c in TRITON_CASES])
def test_matches_naive_triton(case, _triton):
    """As test_matches_naive, through the Triton operators (msfused/triton/projection.py)."""
    run_case(case, device=_triton)


def test_triton_opcheck_and_deterministic(_triton):
    """torch.library.opcheck on the Triton forward and backward operators; gradients bit-identical run to run."""
    case = TRITON_CASES[2]
    _, fused = build_case(case)
    fused.to(_triton)
    x = make_input(case.shape, case.dtype, case.layout).to(_triton)
    from msfused.triton.ops import absent_as_empty

    args, kwargs = _op_arguments(fused, x, True)
    args = args[:2] + tuple(absent_as_empty(ts, x) for ts in args[2:5]) + args[5:]
    forward = torch.ops.msfused.multi_scale_project_forward_triton.default
    torch.library.opcheck(forward, args, kwargs, test_utils=("test_schema", "test_faketensor"))
    out = forward(*args, **kwargs)[0]
    grads = [torch.autograd.grad(forward(*args, **kwargs)[0], [args[0], kwargs["project_weight"]],
                                 torch.ones_like(out)) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    cpu = FORWARD(*_op_arguments(fused, x, False)[0], **_op_arguments(fused, x, False)[1])[0]
    assert (out - cpu).norm() <= 1e-10 * cpu.norm()


# Long gathers split into chunks (launch.SPLIT_STEPS shrunk to 18 taps so that these small maps split too): the
# levels' pooling windows (levels_kernel) and, in the backward, a per-tap branch's maps gradient (bin 1: the
# shifted up-resize's adjoint reads the whole map) and a direct branch's up-resize adjoint (bin 3 with k = 3).
SPLIT_CASES = [
    Case("psp", dict(bins=(1, 3), branch_channels=2, norm="batch", project=_proj(P=3, k=3, activation="silu")),
         (2, 3, 10, 7), train=True, steps=2, label="proj3-train-split"),
    Case("psp", dict(bins=(1, 2), branch_channels=3, input_position="last", align_corners=True,
                     project=_proj(P=4, k=1, bias=True)), (2, 3, 9, 8), dtype=torch.float32, layout="channels_last",
         train=True, label="proj1-train-split"),
]


@pytest.mark.parametrize("case", SPLIT_CASES, ids=[c.id for c in SPLIT_CASES])
def test_triton_split_gathers_match_naive(case, _triton, monkeypatch):
    """The split gathers' partial sums, summed in chunk order by a second launch (no atomics), give the naive
    head's output and gradients; the split really happens (gather_kernel launched over chunks of y taps)."""
    from msfused.triton import launch, projection

    monkeypatch.setattr(launch, "SPLIT_STEPS", 18)
    chunked, real = [], launch._launch

    def watch(kernel, grid, *args, **meta):
        if kernel is projection.gather_kernel and args[18] > args[24]:  # HD > HT: dst's rows are chunks
            chunked.append((args[18] // args[24], args[25], args[12]))  # (chunks, y taps per chunk, y taps)
        real(kernel, grid, *args, **meta)

    monkeypatch.setattr(launch, "_launch", watch)
    run_case(case, device=_triton)
    assert chunked, "no gather was split"
    assert any(chunks * per > taps for chunks, per, taps in chunked), chunked  # a shorter last chunk (masked)


_NO_EXTENSION_SCRIPT = """
import torch, msfused
assert not msfused._ops.loaded()
torch.manual_seed(0)
block = msfused.PyramidPooling(4, 2, bins=(1, 3), project=dict(out_channels=3, kernel_size=3)).double()
x = torch.randn(2, 4, 7, 9, dtype=torch.float64, requires_grad=True)
with msfused.use_backend("triton"):
    out = block(x)
    gx, gw = torch.autograd.grad(out.sum(), [x, block.project.conv.weight])
with msfused.use_backend("reference"):
    ref = block(x)
    rx, rw = torch.autograd.grad(ref.sum(), [x, block.project.conv.weight])
for a, b in ((out, ref), (gx, rx), (gw, rw)):
    assert (a - b).norm() <= 1e-10 * b.norm(), (a - b).norm() / b.norm()
print("ok")
"""


def test_triton_projection_without_the_extension(_triton):
    """Backend 'triton' runs a projection with the C++ extension not loaded (MSFUSED_NO_EXTENSION=1, as the GPU
    check's Triton phase runs during the build): nothing on its path looks up a C++ operator."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, MSFUSED_NO_EXTENSION="1")
    run = subprocess.run([sys.executable, "-c", _NO_EXTENSION_SCRIPT], capture_output=True, text=True, env=env,
                         timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]


@pytest.mark.parametrize("project, error, match", [
    (dict(kernel_size=3), ValueError, "out_channels"),
    (dict(out_channels=4, kernel=3), ValueError, "'kernel'"),
    (dict(out_channels=4, kernel_size=2), ValueError, r"project\['kernel_size'\]"),
    (dict(out_channels=0), ValueError, r"project\['out_channels'\]"),
    (dict(out_channels=4, norm="layer"), ValueError, r"project\['norm'\]"),
    (dict(out_channels=4, activation="tanh"), ValueError, r"project\['activation'\]"),
    (dict(out_channels=4, bias=1), TypeError, r"project\['bias'\]"),
    ([4], TypeError, "project must be None or a dict"),
])
def test_bad_project_argument(project, error, match):
    for cls in (msfused.MultiScaleBlock, msfused.NaivePyramidPooling):
        with pytest.raises(error, match=match):
            cls(3, 2, project=project)


def test_bad_input_named_and_nothing_modified():
    block = msfused.MultiScaleBlock(3, 2, project=_proj(P=4, k=3)).double()
    x = make_input((2, 3, 8, 8))
    with pytest.raises(ValueError, match="in_channels=3"):
        block(make_input((2, 4, 8, 8)))
    block.project.conv.float()
    with pytest.raises(TypeError, match=r"project\.conv\.weight"):
        block(x)
    block.project.conv.double()
    block.project.conv = nn.Conv2d(block.spec.concat_channels, 4, 3, padding=2).double()  # not the block's conv
    with pytest.raises(RuntimeError, match=r"project\.conv is not the plain"):
        with msfused.use_backend("cpu"):
            block(x)
    train = msfused.PyramidPooling(3, 2, bins=(1,), project=_proj(P=4)).double().train()
    with pytest.raises(ValueError, match="project.norm|branches"):
        train(make_input((1, 3, 1, 1)))


def test_state_dict_and_convert_folding():
    """Naive and fused state_dicts match; convert folds naive block + conv + BN + ReLU in an nn.Sequential
    into the fused block's projection (same numbers, same modules), revert keeps the projection."""
    naive, fused = build_pair("psp", 4, dict(bins=(1, 2, 3), branch_channels=2, project=_proj(P=3, k=3)))
    assert naive.state_dict().keys() == fused.state_dict().keys()
    assert "project.conv.weight" in fused.state_dict() and "project.norm.running_mean" in fused.state_dict()
    block = msfused.NaivePyramidPooling(4, 2, bins=(1, 2, 3))
    conv, bn = nn.Conv2d(block.out_channels, 5, 3, padding=1, bias=False), nn.BatchNorm2d(5)
    model = nn.Sequential(block, conv, bn, nn.ReLU(inplace=True), nn.Conv2d(5, 2, 1)).double().eval()
    x = make_input((2, 4, 9, 9))
    want = model(x)
    msfused.convert(model, fold_projections=True)
    assert isinstance(model[0], msfused.PyramidPooling) and model[0].project.conv is conv and model[0].project.norm is bn
    assert all(isinstance(model[i], nn.Identity) for i in (1, 2, 3)) and isinstance(model[4], nn.Conv2d)
    assert model[0].out_channels == 5
    assert torch.allclose(model(x), want, rtol=1e-10, atol=1e-12)
    msfused.revert(model)
    assert isinstance(model[0], msfused.NaivePyramidPooling) and model[0].project.conv is conv
    assert torch.allclose(model(x), want, rtol=1e-10, atol=1e-12)
    # A conv that the kernels do not compute (dilated) is left alone.
    odd = nn.Sequential(msfused.NaivePyramidPooling(4, 2, bins=(1, 2)),
                        nn.Conv2d(4 + 4, 5, 3, padding=2, dilation=2))
    msfused.convert(odd, fold_projections=True)
    assert odd[0].project is None and isinstance(odd[1], nn.Conv2d)


def test_reference_backend_and_auto_agree():
    naive, fused, shape = _small_block("psp", train=False)
    x = make_input(shape)
    with msfused.use_backend("reference"):
        ref = fused(x)
    assert torch.allclose(fused(x), ref, rtol=1e-10, atol=1e-12)
    assert torch.allclose(naive(x), ref, rtol=0, atol=0)


def test_combinations_cover_the_axes():
    """The sampled grid really covers every value of every axis (it is drawn, so check it)."""
    seen = {k: set() for k in ("k", "bias", "norm", "act", "pos", "layout", "dtype", "kind")}
    for c in GRID:
        p = c.kwargs["project"]
        seen["k"].add(p["kernel_size"])
        seen["bias"].add(p["bias"])
        seen["norm"].add("train" if c.train and p["norm"] else ("eval" if p["norm"] else "none"))
        seen["act"].add(p["activation"])
        seen["pos"].add(c.kwargs.get("input_position", "first"))
        seen["layout"].add(c.layout)
        seen["dtype"].add(c.dtype)
        seen["kind"].add(c.kind)
    want = dict(k={1, 3}, bias={False, True}, norm={"none", "eval", "train"}, act={"relu", "silu", "gelu", None},
                pos={"first", "last", None}, layout={"contiguous", "channels_last"},
                dtype={torch.float64, torch.float32}, kind={"ms", "psp"})
    for axis, values in want.items():
        assert values <= seen[axis], f"{axis}: {values - seen[axis]} never drawn"


