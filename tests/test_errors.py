"""Bad input (SPEC.md): each raises ValueError / TypeError / RuntimeError whose message names the argument,
for the fused and the naive modules alike, and nothing the caller passed is modified. Also: where the
reference raises the fused module raises the same type; second-order gradients; the operators' own checks."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import msfused
from .conftest import FUSED, NAIVE, build_pair, make_input, norm_err

KINDS = ["fused", "naive"]


def _module(which: str, kind: str, *args, **kwargs):
    return (FUSED if which == "fused" else NAIVE)[kind](*args, **kwargs)


# ---------------------------------------------------------------------------------------------------
# Constructor arguments
# ---------------------------------------------------------------------------------------------------

CTOR_ERRORS = [
    # (id, kind, kwargs, exception, message must contain)
    ("even_kernel", "ms", dict(kernel_size=2), ValueError, "kernel_size"),
    ("even_kernel_per_branch", "ms", dict(kernel_size=(3, 4, 3)), ValueError, "kernel_size[1]"),
    ("even_kernel_psp", "psp", dict(kernel_size=2), ValueError, "kernel_size"),
    ("kernel_zero", "ms", dict(kernel_size=0), ValueError, "kernel_size"),
    ("down_mode_cubic", "ms", dict(down_mode="cubic"), ValueError, "down_mode"),
    ("up_mode_bicubic", "ms", dict(up_mode="bicubic"), ValueError, "up_mode"),
    ("up_mode_psp", "psp", dict(up_mode="area"), ValueError, "up_mode"),
    ("activation_tanh", "ms", dict(activation="tanh"), ValueError, "activation"),
    ("activation_psp", "psp", dict(activation="leaky_relu"), ValueError, "activation"),
    ("input_position", "ms", dict(input_position="middle"), ValueError, "input_position"),
    ("norm_layer", "ms", dict(norm="layer"), ValueError, "norm"),
    ("channels_wrong_length", "ms", dict(branch_channels=(4, 4)), ValueError, "branch_channels"),
    ("kernel_wrong_length", "psp", dict(kernel_size=(1, 1)), ValueError, "kernel_size"),
    ("bias_wrong_length", "ms", dict(bias=(True,)), ValueError, "bias"),
    ("norm_wrong_length", "psp", dict(norm=("batch", None)), ValueError, "norm"),
    ("bias_not_bool", "ms", dict(bias="yes"), TypeError, "bias"),
    ("scale_zero", "ms", dict(scales=(1, 0)), ValueError, "scales[1]"),
    ("scales_empty", "ms", dict(scales=()), ValueError, "scales"),
    ("scale_float", "ms", dict(scales=(1.5,)), TypeError, "scales[0]"),
    ("bin_zero", "psp", dict(bins=(1, 0)), ValueError, "bins[1]"),
    ("bin_triple", "psp", dict(bins=((2, 3, 4),)), ValueError, "bins[0]"),
    ("bins_empty", "psp", dict(bins=()), ValueError, "bins"),
    ("branch_channels_zero", "ms", dict(branch_channels=0), ValueError, "branch_channels"),
    ("in_channels_zero", "ms", dict(in_channels=0), ValueError, "in_channels"),
    ("align_corners_str", "ms", dict(align_corners="yes"), TypeError, "align_corners"),
]


@pytest.mark.parametrize("which", KINDS)
@pytest.mark.parametrize("name,kind,kwargs,exc,match", CTOR_ERRORS, ids=[c[0] for c in CTOR_ERRORS])
def test_constructor_errors(which, name, kind, kwargs, exc, match):
    kw = dict(in_channels=3, branch_channels=4)
    kw.update(kwargs)
    with pytest.raises(exc) as info:
        _module(which, kind, **kw)
    assert match in str(info.value), f"message does not name {match!r}: {info.value}"


# ---------------------------------------------------------------------------------------------------
# Bad inputs to forward
# ---------------------------------------------------------------------------------------------------


def _input_cases():
    # (id, module kind, module kwargs, module dtype, make x, exception, message must contain (any of))
    return [
        ("rank3", "ms", {}, torch.float32, lambda: torch.randn(3, 8, 8), ValueError, ("x", "4-D")),
        ("rank5", "psp", {}, torch.float32, lambda: torch.randn(1, 2, 3, 8, 8), ValueError, ("x", "4-D")),
        ("wrong_channels", "ms", {}, torch.float32, lambda: torch.randn(2, 4, 8, 8), ValueError, ("in_channels",)),
        ("wrong_channels_psp", "psp", {}, torch.float32, lambda: torch.randn(2, 2, 8, 8), ValueError,
         ("in_channels",)),
        ("level_below_1x1", "ms", dict(scales=(1, 2, 8)), torch.float32, lambda: torch.randn(2, 3, 5, 5), ValueError,
         ("scales[2]", "1x1")),
        ("level_below_1x1_width", "ms", dict(scales=(1, 4)), torch.float32, lambda: torch.randn(2, 3, 9, 3),
         ValueError, ("scales[1]", "1x1")),
        ("int_dtype", "ms", {}, torch.float32, lambda: torch.randint(-3, 3, (2, 3, 8, 8)), TypeError, ("x", "int")),
        ("bool_dtype", "psp", {}, torch.float32, lambda: torch.randn(2, 3, 8, 8) > 0, TypeError, ("x", "bool")),
        ("complex_dtype", "ms", {}, torch.float32, lambda: torch.randn(2, 3, 8, 8, dtype=torch.complex64),
         TypeError, ("x",)),
        ("x_f64_weights_f32", "ms", {}, torch.float32, lambda: torch.randn(2, 3, 8, 8, dtype=torch.float64),
         TypeError, ("weight", "dtype")),
        ("x_f32_weights_f64", "psp", {}, torch.float64, lambda: torch.randn(2, 3, 8, 8), TypeError,
         ("weight", "dtype")),
        ("x_bf16_weights_f32", "ms", {}, torch.float32, lambda: torch.randn(2, 3, 8, 8).bfloat16(), TypeError,
         ("weight", "dtype")),
        ("not_a_tensor", "ms", {}, torch.float32, lambda: [[1.0]], TypeError, ("x",)),
        ("mixed_devices_meta", "ms", {}, torch.float32, lambda: torch.randn(2, 3, 8, 8, device="meta"),
         (ValueError, TypeError, RuntimeError), ("x", "cpu")),
    ]


INPUT_CASES = _input_cases()


@pytest.mark.parametrize("which", KINDS)
@pytest.mark.parametrize("name,kind,kwargs,dtype,make_x,exc,match", INPUT_CASES, ids=[c[0] for c in INPUT_CASES])
def test_forward_input_errors(which, name, kind, kwargs, dtype, make_x, exc, match):
    module = _module(which, kind, 3, 4, **kwargs).to(dtype)
    if any(isinstance(m, nn.BatchNorm2d) for m in module.modules()):
        module.train()
    x = make_x()
    x_before = x.clone() if isinstance(x, torch.Tensor) and x.device.type != "meta" else copy.deepcopy(x)
    state_before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(exc) as info:
        module(x)
    msg = str(info.value)
    for m in match:
        assert m in msg, f"message does not name {m!r}: {msg}"
    # Nothing the caller passed was modified (running statistics included).
    if isinstance(x, torch.Tensor) and x.device.type != "meta":
        assert torch.equal(x, x_before)
    elif isinstance(x, torch.Tensor):  # meta: no values, so the metadata
        assert (x.shape, x.stride(), x.dtype) == (x_before.shape, x_before.stride(), x_before.dtype)
    else:
        assert x == x_before
    for k, v in module.state_dict().items():
        assert torch.equal(v, state_before[k]), f"{k} changed on a refused call"


def test_parameters_on_another_device_named():
    """A parameter on another device than x is named (meta stands in for a second device here)."""
    for which in KINDS:
        module = _module(which, "ms", 3, 4)
        module.branches[1].conv.to("meta")
        x = make_input((2, 3, 8, 8), torch.float32)
        with pytest.raises((ValueError, TypeError, RuntimeError)) as info:
            module(x)
        assert "branches[1]" in str(info.value) and "meta" in str(info.value), str(info.value)


# ---------------------------------------------------------------------------------------------------
# Where the reference itself raises, the fused module raises the same exception type.
# ---------------------------------------------------------------------------------------------------

SINGLE_VALUE_CASES = [
    ("psp_bin1_n1", "psp", dict(bins=(1, 2, 3, 6)), (1, 3, 9, 9)),
    ("psp_bin1x1_pair_n1", "psp", dict(bins=((1, 1), (2, 3))), (1, 3, 9, 9)),
    ("ms_level1x1_n1", "ms", dict(scales=(1, 4), norm="batch"), (1, 3, 4, 5)),
    ("ms_per_branch_norm", "ms", dict(scales=(1, 8), norm=(None, "batch")), (1, 3, 9, 8)),
]


@pytest.mark.parametrize("name,kind,kwargs,shape", SINGLE_VALUE_CASES, ids=[c[0] for c in SINGLE_VALUE_CASES])
def test_one_value_per_channel_in_training(name, kind, kwargs, shape):
    naive, fused = build_pair(kind, 3, kwargs, torch.float32)
    naive.train(), fused.train()
    x = make_input(shape, torch.float32)
    pristine = copy.deepcopy(naive)  # the naive module may update earlier branches' statistics before raising
    with pytest.raises(Exception) as ref_info:
        naive(x)
    state_before = {k: v.clone() for k, v in fused.state_dict().items()}
    with pytest.raises(type(ref_info.value)) as info:
        fused(x)
    assert type(info.value) is type(ref_info.value) is ValueError
    assert "Expected more than 1 value per channel when training" in str(info.value)
    for k, v in fused.state_dict().items():
        assert torch.equal(v, state_before[k]), f"{k} changed on a refused call"
    # The same input is fine in eval mode, and equal to the reference.
    pristine.eval(), fused.eval()
    assert norm_err(fused(x), pristine.double()(x.double())) <= 1e-5


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_empty_batch(train):
    """N = 0: the reference returns an empty output; the fused module returns the same or refuses clearly."""
    naive, fused = build_pair("ms", 3, dict(norm="batch"), torch.float64)
    naive.train(train), fused.train(train)
    x = torch.randn(0, 3, 8, 8, dtype=torch.float64)
    ref = naive(x)
    try:
        out = fused(x)
    except (ValueError, RuntimeError) as e:
        assert train and ("batch" in str(e) or "value" in str(e) or "N" in str(e)), str(e)
        return
    assert out.shape == ref.shape == (0, fused.out_channels, 8, 8)


# ---------------------------------------------------------------------------------------------------
# Backend names
# ---------------------------------------------------------------------------------------------------


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="use_backend"):
        with msfused.use_backend("gpu"):
            pass
    with pytest.raises(ValueError, match="backend"):
        msfused.availability("fast")


# ---------------------------------------------------------------------------------------------------
# Second-order gradients: a clear RuntimeError (SPEC.md: unless supported; then they must be right).
# ---------------------------------------------------------------------------------------------------


def _second_order_setup():
    naive, fused = build_pair("ms", 3, dict(scales=(1, 2), down_mode="bilinear", activation="silu"), torch.float64)
    x = make_input((2, 3, 7, 8), torch.float64, requires_grad=True)
    return naive, fused, x


def test_second_order_with_grad_outputs_requiring_grad():
    """Gradient penalty style: the upstream gradient itself requires grad."""
    _, fused, x = _second_order_setup()
    out = fused(x)
    with pytest.raises(RuntimeError, match="second-order"):
        gx, = torch.autograd.grad(out.pow(2).sum(), x, create_graph=True)
        gx.pow(2).sum().backward()


def test_second_order_with_constant_grad_outputs():
    """grad(out.sum(), x, create_graph=True), then backward through that gradient: either a clear
    RuntimeError, or the right second-order gradients (never missing or silently wrong ones)."""
    naive, fused, x = _second_order_setup()
    try:
        gx, = torch.autograd.grad(fused(x).sum(), x, create_graph=True)
        gx.pow(2).sum().backward()
    except RuntimeError as e:
        assert "second-order" in str(e) or "double backward" in str(e), f"unclear error: {e}"
        return
    x2 = x.detach().clone().requires_grad_(True)
    gx_ref, = torch.autograd.grad(naive(x2).sum(), x2, create_graph=True)
    gx_ref.pow(2).sum().backward()
    assert x.grad is not None, "second backward left x.grad empty without an error"
    assert norm_err(x.grad, x2.grad) <= 1e-10
    for (n, p), (_, q) in zip(fused.named_parameters(), naive.named_parameters()):
        assert p.grad is not None, f"second backward left {n}.grad empty without an error"
        assert norm_err(p.grad, q.grad) <= 1e-10, n


# ---------------------------------------------------------------------------------------------------
# The operators' own checks (for callers that bypass the module).
# ---------------------------------------------------------------------------------------------------

FORWARD = torch.ops.msfused.multi_scale_forward.default
BACKWARD = torch.ops.msfused.multi_scale_backward.default


def _op_args(x=None, weight=None, bias=None, **over):
    x = torch.randn(2, 3, 8, 8) if x is None else x
    weight = [torch.randn(4, 3, 3, 3), torch.randn(2, 3, 1, 1)] if weight is None else weight
    B = len(weight)
    kw = dict(factor=[1, 2], bins=[0, 0, 0, 0], down_mode="avg", up_mode="bilinear", align_corners=False,
              activation="relu", input_position="first")
    args = dict(x=x, weight=weight, bias=[None] * B if bias is None else bias, scale=[None] * B, shift=[None] * B,
                batch_stats=[False] * B, eps=[1e-5] * B)
    args.update({k: v for k, v in over.items() if k in args})
    kw.update({k: v for k, v in over.items() if k in kw})
    return args, kw


OP_ERRORS = [
    ("rank3", dict(x=torch.randn(3, 8, 8)), ValueError, "x must be 4-D"),
    ("even_kernel", dict(weight=[torch.randn(4, 3, 2, 2), torch.randn(2, 3, 1, 1)]), ValueError, "weight[0]"),
    ("channels", dict(weight=[torch.randn(4, 5, 3, 3), torch.randn(2, 5, 1, 1)]), ValueError, "weight[0]"),
    ("factor_length", dict(factor=[1]), ValueError, "one entry per branch"),
    ("eps_length", dict(eps=[1e-5]), ValueError, "one entry per branch"),
    ("bias_length", dict(bias=[None]), ValueError, "one entry"),
    ("level", dict(factor=[1, 9]), ValueError, "at least 1x1"),
    ("down_mode", dict(down_mode="cubic"), ValueError, "down_mode"),
    ("up_mode", dict(up_mode="cubic"), ValueError, "up_mode"),
    ("activation", dict(activation="tanh"), ValueError, "activation"),
    ("input_position", dict(input_position="middle"), ValueError, "input_position"),
    ("int_x", dict(x=torch.randint(0, 3, (2, 3, 8, 8)), weight=[torch.randn(4, 3, 3, 3), torch.randn(2, 3, 1, 1)]),
     (TypeError, RuntimeError), "x"),
    ("weight_dtype", dict(weight=[torch.randn(4, 3, 3, 3, dtype=torch.float64), torch.randn(2, 3, 1, 1)]),
     (TypeError, RuntimeError), "weight[0]"),
    ("bias_dtype", dict(bias=[torch.randn(4, dtype=torch.float64), None]), (TypeError, RuntimeError), "bias[0]"),
]


@pytest.mark.parametrize("name,over,exc,match", OP_ERRORS, ids=[c[0] for c in OP_ERRORS])
def test_operator_forward_errors(name, over, exc, match):
    args, kw = _op_args(**over)
    tensors = [args["x"]] + list(args["weight"]) + [b for b in args["bias"] if b is not None]
    before = [t.clone() for t in tensors]
    with pytest.raises(exc) as info:
        FORWARD(*args.values(), **kw)
    assert match in str(info.value), str(info.value)
    assert all(torch.equal(a, b) for a, b in zip(tensors, before))


def test_operator_backward_grad_shape_error():
    args, kw = _op_args()
    out, level, pre, mean, var = FORWARD(*args.values(), **kw)
    bad = torch.randn(out.shape[0], out.shape[1] - 1, *out.shape[2:])
    with pytest.raises(ValueError, match="grad_out"):
        BACKWARD(bad, args["x"], args["weight"], args["scale"], args["shift"], level, pre, mean, var,
                 args["batch_stats"], args["eps"], output_mask=[True, True], **kw)


# ---------------------------------------------------------------------------------------------------
# NaN and Inf in the input propagate exactly as the reference propagates them (issue 6).
# ---------------------------------------------------------------------------------------------------

NONFINITE_CONFIGS = [
    ("ms", dict(scales=(1, 2, 4), down_mode="bilinear", norm="batch")),
    ("ms", dict(scales=(1, 3), down_mode="nearest", up_mode="nearest", kernel_size=(1, 3))),
    ("psp", dict(bins=(1, 2, 3, 6), align_corners=True)),
]


def _same_or_both_nan(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(((a == b) | (a.isnan() & b.isnan())).all())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("activation", ["relu", "silu", "gelu", None])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("kind,kwargs", NONFINITE_CONFIGS, ids=["ms124", "ms13_nearest", "psp"])
def test_nan_inf_propagate_as_reference(kind, kwargs, value, activation, train, dtype):
    """The same elements are NaN, +Inf and -Inf in the fused output as in the naive one (gelu(+Inf) is NaN
    in ATen's CPU float kernel: so here too), the finite ones equal; x is not modified."""
    naive, fused = build_pair(kind, 3, dict(kwargs, activation=activation), dtype)
    naive.train(train), fused.train(train)
    x = make_input((2, 3, 12, 11), dtype)
    x[0, 1, 5, 4] = float(value)
    x[1, 2, 0, 10] = float(value)  # on the border too
    x_before = x.clone()
    out, ref = fused(x), naive(x)
    for name, mask in (("NaN", torch.isnan), ("+Inf", torch.isposinf), ("-Inf", torch.isneginf)):
        assert torch.equal(mask(out), mask(ref)), (
            f"{name} at {int(mask(out).sum())} elements of the fused output, {int(mask(ref).sum())} of the naive one")
    finite = torch.isfinite(ref)
    if finite.any():
        assert norm_err(out[finite], ref[finite]) <= (1e-10 if dtype == torch.float64 else 1e-4)
    assert _same_or_both_nan(x, x_before), "x was modified"
    for (n, a), (_, b) in zip(fused.named_buffers(), naive.named_buffers()):
        assert a.dtype == b.dtype and (torch.equal(a, b) if not a.is_floating_point() else
                                       torch.equal(a.isnan(), b.isnan())), f"{n} differs from the naive module's"


# ---------------------------------------------------------------------------------------------------
# Huge factors and bins, empty maps, tensors past 2**31 elements (issue 6).
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", KINDS)
@pytest.mark.parametrize("scale", [2**31, 2**62, 2**64, 10**30])
def test_huge_factor_is_a_level_below_1x1(which, scale):
    module = _module(which, "ms", 3, 2, scales=(1, scale))
    x = make_input((2, 3, 8, 8), torch.float32)
    with pytest.raises(ValueError, match=r"scales\[1\].*1x1"):
        module(x)


@pytest.mark.parametrize("bins", [(2**33,), ((1, 2**62),), (2**40, 2)], ids=["2^33", "1x2^62", "2^40"])
def test_huge_bins_raise_as_the_reference(bins):
    """Bins whose level cannot even be sized (element count past int64): the reference raises a
    RuntimeError while sizing it, and so does the fused module (no crash, nothing allocated, x unmodified)."""
    naive, fused = build_pair("psp", 3, dict(bins=bins), torch.float32)
    x = make_input((2, 3, 8, 8), torch.float32)
    before = x.clone()
    with pytest.raises(Exception) as ref_info:
        naive(x)
    with pytest.raises(type(ref_info.value)):
        fused(x)
    assert isinstance(ref_info.value, RuntimeError)
    assert torch.equal(x, before)


@pytest.mark.parametrize("which", KINDS)
@pytest.mark.parametrize("shape", [(2, 3, 0, 5), (2, 3, 5, 0), (0, 3, 0, 0)], ids=["H0", "W0", "N0H0W0"])
@pytest.mark.parametrize("kind", ["ms", "psp"])
def test_empty_map_refused(kind, shape, which):
    """H or W = 0: a ValueError naming x (the reference raised from its upsample or level check; the
    operator itself refuses too, for callers that bypass the module)."""
    module = _module(which, kind, 3, 2)
    with pytest.raises(ValueError, match="x|level"):
        module(torch.randn(*shape))
    with pytest.raises(ValueError, match="empty map"):
        FORWARD(*_op_args(x=torch.randn(*shape))[0].values(), **_op_args()[1])


def _expanded(shape) -> torch.Tensor:
    """A tensor of ``shape`` viewing one element (stride 0): any number of elements, no memory."""
    return torch.randn(1, 1, 1, 1).expand(*shape)


def test_index_limit_policy():
    """Past 2**31 - 1 elements in any tensor of a call (x, the output, a level, a convolution output), a
    backend with 32-bit offsets (Triton) refuses up front, naming the tensor; the CPU kernels index with
    int64 and accept."""
    spec = msfused.MultiScaleBlock(3, 2, scales=(1, 2)).spec
    big_x = _expanded((2**15, 3, 2**8, 2**8))  # 3 * 2**31 elements
    why = msfused.backends.index_limit_reason("triton", big_x, spec)
    assert why and "32-bit" in why and "2**31" in why and "'triton'" in why, why
    assert msfused.backends.index_limit_reason("cpu", big_x, spec) is None
    # x below the limit, the output (x and two branches of 2 channels: 7 channels) past it
    x = _expanded((2**13, 3, 2**8, 2**8))
    assert x.numel() < 2**31 - 1
    why = msfused.backends.index_limit_reason("triton", x, spec)
    assert why and "the output" in why, why
    small = _expanded((2, 3, 8, 8))
    assert msfused.backends.index_limit_reason("triton", small, spec) is None


@pytest.mark.parametrize("capability,arch_list,runs", [
    ((9, 0), "8.0;9.0+PTX", True), ((8, 0), "8.0;9.0+PTX", True), ((8, 6), "8.0;9.0+PTX", True),
    ((8, 9), "8.0;9.0+PTX", True), ((10, 0), "8.0;9.0+PTX", True),  # PTX of 9.0, compiled by the driver
    ((7, 5), "8.0;9.0+PTX", False), ((7, 0), "8.0;9.0+PTX", False), ((10, 0), "8.0;9.0", False),
    ((9, 0), "9.0a", True), ((10, 0), "9.0a", False), ((8, 0), "8.6", False), ((7, 5), "7.0 7.5", True),
    ((7, 5), None, True), ((7, 5), "native", True),  # unknown list: the launch itself would say
])
def test_cuda_arch_policy(capability, arch_list, runs):
    """Backend 'cuda' declines a GPU its kernels were not built for (so that 'auto' falls back rather than
    failing with "no kernel image is available"), naming the arch list and the capability."""
    why = msfused.backends.cuda_arch_reason(capability, arch_list)
    assert (why is None) == runs, why
    if why:
        assert arch_list in why and f"{capability[0]}.{capability[1]}" in why and "TORCH_CUDA_ARCH_LIST" in why


@pytest.mark.parametrize("kind", ["ms", "psp"])
def test_past_2_31_elements_refused_before_any_work(monkeypatch, kind):
    """A backend with 32-bit offsets asked to run a stride-0 x of 3 * 2**31 elements raises a clear
    RuntimeError in the backend choice, before any kernel or allocation (Triton stands in as available)."""
    real = msfused.backends.availability
    monkeypatch.setattr(msfused.backends, "availability",
                        lambda name: (True, "") if name == "triton" else real(name))
    base = torch.randn(1, 1, 1, 1)
    before = base.clone()
    x = base.expand(2**15, 3, 2**8, 2**8)
    module = _module("fused", kind, 3, 2)
    with msfused.use_backend("triton"), pytest.raises(RuntimeError, match=r"triton.*2\*\*31"):
        module(x)
    assert torch.equal(base, before)


def test_buffers_on_another_device_named():
    """A norm's running statistics on another device than x (meta stands in for a second device) are named,
    for the fused and the naive module alike."""
    for which in KINDS:
        module = _module(which, "ms", 3, 4, norm="batch").eval()
        module.branches[1].norm.running_mean = module.branches[1].norm.running_mean.to("meta")
        with pytest.raises(ValueError, match=r"branches\[1\]\.norm\.running_mean.*meta"):
            module(make_input((2, 3, 8, 8), torch.float32))
