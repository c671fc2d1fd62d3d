"""The functional layer's parameter cache (issue 11): an eval-mode norm's fold and the Triton backend's packed
weights are computed once and reused while their tensors stay the same, recomputed after load_state_dict,
``.data =``, in-place updates, dtype and device moves, and the fold never cached where a gradient flows
through it (it is differentiable); each time with the naive module's numbers. The Triton inference call's
host work is pinned: at most 10 ATen ops besides its kernel launches (issue 12)."""

from __future__ import annotations

import functools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

import msfused
from msfused import functional

from .conftest import Checker, build_pair, norm_err, randomize_, reference64


def _count_calls(monkeypatch, module, name: str) -> list:
    """[calls of module.name from now on]."""
    count = [0]
    real = getattr(module, name)

    def counting(*args):
        count[0] += 1
        return real(*args)

    monkeypatch.setattr(module, name, counting)
    return count


@pytest.fixture
def folds(monkeypatch):
    """Counts the folds computed."""
    functional.PARAM_CACHE.clear()
    yield _count_calls(monkeypatch, functional, "_fold_norm")
    functional.PARAM_CACHE.clear()


def _pair(dtype=torch.float64):
    naive, fused = build_pair("psp", 4, dict(bins=(1, 2, 3), norm="batch", branch_channels=3), dtype)
    return naive.eval(), fused.eval()


def _check(naive, fused, dtype=torch.float64):
    x = torch.randn(2, 4, 7, 6, dtype=dtype)
    with torch.no_grad():
        assert norm_err(fused(x), naive(x)) <= (1e-10 if dtype == torch.float64 else 1e-5)


def test_fold_reused_until_a_tensor_changes(folds):
    naive, fused = _pair()
    _check(naive, fused)
    assert folds[0] == 3  # one per norm
    _check(naive, fused)
    _check(naive, fused)
    assert folds[0] == 3
    # in place (an optimizer step, running statistics): _version
    with torch.no_grad():
        for m in (naive, fused):
            m.branches[1].norm.running_var.mul_(1.7)
            m.branches[2].norm.weight.add_(0.3)
    _check(naive, fused)
    assert folds[0] == 5
    # load_state_dict (copies in place) from other random values
    other, _ = _pair()
    randomize_(other)
    naive.load_state_dict(other.state_dict())
    fused.load_state_dict(other.state_dict())
    _check(naive, fused)
    assert folds[0] == 8
    # .data = (a new storage, same tensor object)
    for m in (naive, fused):
        m.branches[0].norm.bias.data = torch.full_like(m.branches[0].norm.bias, 0.25)
    _check(naive, fused)
    assert folds[0] == 9
    # load_state_dict(assign=True): new tensor objects
    fused.load_state_dict({k: v.clone() for k, v in fused.state_dict().items()}, assign=True)
    _check(naive, fused)
    assert folds[0] == 12
    # eps (a plain attribute)
    for m in (naive, fused):
        m.branches[2].norm.eps = 1e-2
    _check(naive, fused)
    assert folds[0] == 13


def test_fold_recomputed_after_a_dtype_move(folds):
    naive, fused = _pair(torch.float32)
    _check(naive, fused, torch.float32)
    naive.double()
    fused.double()
    _check(naive, fused)
    assert folds[0] == 6


def test_signature_sees_the_device():
    t = torch.ones(3)
    sig = functional.ParamCache._signature([t])
    assert sig[0][3] == t.device and functional.ParamCache._same(sig, functional.ParamCache._signature([t]))
    assert not functional.ParamCache._same(sig, functional.ParamCache._signature([t.clone()]))


def test_lookup_agrees_with_the_signature():
    """The per-call lookup (_matches, which builds no signature) says what comparing signatures says."""
    a, b = torch.ones(3), torch.zeros(2, 2)
    sig = functional.ParamCache._signature([a, None, b])
    cases = {
        "same": ([a, None, b], True),
        "another tensor": ([a.clone(), None, b], False),
        "a None given a tensor": ([a, b, b], False),
        "a tensor given None": ([a, None, None], False),
        "shorter": ([a, None], False),
    }
    for what, (tensors, expected) in cases.items():
        same = functional.ParamCache._same(sig, functional.ParamCache._signature(tensors))
        assert functional.ParamCache._matches(sig, tensors) == same == expected, what
    for what, change in (("in place", lambda: a.add_(1)), ("new data", lambda: setattr(b, "data", torch.zeros(4))),
                         ("a view of other shape", lambda: setattr(a, "data", a.data.view(1, 3))),
                         ("dtype", lambda: setattr(b, "data", b.data.double()))):
        sig = functional.ParamCache._signature([a, None, b])
        change()
        assert not functional.ParamCache._matches(sig, [a, None, b]), what
        assert not functional.ParamCache._same(sig, functional.ParamCache._signature([a, None, b])), what


def test_never_cached_where_a_gradient_flows(folds):
    """Grad mode on and the norm's affine parameters requiring grad: the fold is computed per call and its
    gradient reaches them; frozen parameters (or no grad mode) use the cache."""
    naive, fused = _pair()
    x = torch.randn(2, 4, 7, 6, dtype=torch.float64)
    for _ in range(2):
        out = fused(x)
    assert folds[0] == 6
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, [fused.branches[1].norm.weight, fused.branches[1].norm.bias], g)
    want = torch.autograd.grad(naive(x), [naive.branches[1].norm.weight, naive.branches[1].norm.bias], g)
    for a, b in zip(got, want):
        assert norm_err(a, b, g.norm().item()) <= 1e-10
    fused.requires_grad_(False)
    fused(x)
    fused(x)
    assert folds[0] == 9
    with torch.inference_mode():
        fused(x)
    assert folds[0] == 9  # a fold cached outside inference mode serves it
    fused.requires_grad_(True)
    with torch.no_grad():  # the same values: still the cached fold
        fused(x)
    assert folds[0] == 9


def test_entries_die_with_their_owner():
    """An entry owned by a tensor (a backend's packing) does not keep the tensor alive (its value must not be a
    view of it either: the Triton backend's packing copies, below)."""
    import gc
    import weakref

    cache = functional.ParamCache()
    t = torch.randn(3, 2)
    value = cache.get(t, "copy", (t,), (), functools.partial(torch.mul, t, 2))
    assert cache.get(t, "copy", (t,), (), lambda: None) is value
    ref = weakref.ref(t)
    del t
    gc.collect()
    assert ref() is None and len(cache._entries) == 0 and value.shape == (3, 2)


def test_fold_recomputed_after_a_device_move(folds):
    """Module.to(device) gives the parameters new storage on the device (or new tensors): a new fold there."""
    conv, norm = torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4).eval()
    with torch.no_grad():
        _, scale, _, _, _ = functional._norm_epilogue(conv, norm)
        assert functional._norm_epilogue(conv, norm)[1] is scale and folds[0] == 1
        conv.to("meta"), norm.to("meta")
        _, moved, _, _, _ = functional._norm_epilogue(conv, norm)
        assert moved.device.type == "meta" and folds[0] == 2


# ---------------------------------------------------------------------------------------------------
# The Triton backend's host work per call (issue 12): packed weights from the parameter cache, shape-only
# tables per shape, so that an eval-mode inference call runs a handful of ATen ops besides its launches.
# ---------------------------------------------------------------------------------------------------

triton_ok, triton_why = msfused.availability("triton")
needs_triton = pytest.mark.skipif(not triton_ok, reason=f"Triton backend unavailable: {triton_why}")


@pytest.fixture
def packs(monkeypatch):
    """Counts the Triton backend's weight packings."""
    from msfused.triton import launch

    functional.PARAM_CACHE.clear()
    with msfused.use_backend("triton"):
        yield _count_calls(monkeypatch, launch, "_pack_weight")
    functional.PARAM_CACHE.clear()


class _HostOps(TorchDispatchMode):
    """Records the ATen ops of a call, inside the Triton inference operator too (its implementation is run
    under the mode), but not those of the kernel launches themselves (``quiet`` wraps ``launch._launch``)."""

    def __init__(self):
        super().__init__()
        self.ops, self.launches = [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from msfused.triton import ops

        self.ops.append(str(func))
        if func is ops.multi_scale_inference_triton._opoverload:
            with self:
                return ops.multi_scale_inference_triton._init_fn(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))

    def quiet(self, real):
        def launch(*args, **kwargs):
            self.launches += 1
            with _disable_current_modes():
                return real(*args, **kwargs)
        return launch


HOST_OP_BLOCKS = [
    # bin 1 pools 289 taps: in chunks (SPLIT_STEPS), the levels' partial sums stacked in one buffer
    ("psp", dict(bins=(1, 2, 3, 6), norm="batch", input_position="first", branch_channels=2), (1, 3, 17, 17)),
    ("ms", dict(scales=(1, 2, 4), norm="batch", kernel_size=(1, 3, 3), activation="gelu", input_position="last"),
     (1, 3, 8, 8)),
]


@needs_triton
@pytest.mark.parametrize("kind,kwargs,shape", HOST_OP_BLOCKS, ids=("psp", "ms"))
def test_triton_inference_host_ops(kind, kwargs, shape, monkeypatch, packs):
    """An eval-mode inference call with unchanged parameters: at most 10 ATen ops besides the kernel launches
    (the output, the levels and the tile scratch allocated; no packing, norm fold or table built)."""
    from msfused.triton import launch

    naive, fused = build_pair(kind, shape[1], kwargs, torch.float32)
    naive.eval(), fused.eval()
    x = torch.randn(shape)
    with torch.no_grad():
        fused(x)  # the parameter cache and the tables filled
        mode = _HostOps()
        monkeypatch.setattr(launch, "_launch", mode.quiet(launch._launch))
        with mode:
            out = fused(x)
        assert norm_err(out, naive(x)) <= 1e-5
    assert "msfused.multi_scale_inference_triton.default" in mode.ops and mode.launches == (2 if kind == "psp" else 1)
    assert len(mode.ops) - 1 <= 10, mode.ops
    assert packs[0] == len(fused.branches)  # packed by the first call only


@needs_triton
def test_triton_packed_weight_is_never_a_view():
    """A (1, C, 1, 1) weight packs to a view of itself; the cached packing is a copy (a view would keep the
    parameter, its owner, alive)."""
    from msfused.triton import launch

    w = torch.randn(1, 5, 1, 1)
    assert launch._pack_weight(w)._base is not None
    wk = launch._packed_weight(w)
    assert wk._base is None and torch.equal(wk, w.reshape(1, 5).t())


@needs_triton
def test_triton_packed_weights_recomputed_when_a_parameter_changes(packs):
    naive, fused = build_pair("ms", 3, dict(scales=(1, 2), norm="batch", kernel_size=(3, 1)), torch.float64)
    naive.eval(), fused.eval()
    x = torch.randn(1, 3, 6, 5, dtype=torch.float64)

    def check(expected):
        with torch.no_grad():
            assert norm_err(fused(x), naive(x)) <= (1e-10 if x.dtype == torch.float64 else 1e-5)
        assert packs[0] == expected

    check(2)
    check(2)
    with torch.no_grad():  # in place (an optimizer step)
        for m in (naive, fused):
            m.branches[1].conv.weight.mul_(-1.5)
    check(3)
    other, _ = build_pair("ms", 3, dict(scales=(1, 2), norm="batch", kernel_size=(3, 1)), torch.float64)
    for m in (naive, fused):  # load_state_dict copies in place
        m.load_state_dict(other.state_dict())
    check(5)
    new = torch.randn_like(fused.branches[0].conv.weight)
    for m in (naive, fused):  # .data =
        m.branches[0].conv.weight.data = new.clone()
    check(6)
    fused.load_state_dict({k: v.clone() for k, v in fused.state_dict().items()}, assign=True)  # new tensors
    check(8)
    naive.float(), fused.float()  # a dtype move
    x = x.float()
    check(10)
    # training calls: the training operators pack per call (forward, and the level gradient's flipped weights)
    x.requires_grad_(True)
    for _ in range(2):
        for m in (naive, fused):
            m.zero_grad()
            m(x).square().sum().backward()
    assert packs[0] == 18
    for m in (naive, fused):
        torch.optim.SGD(m.parameters(), lr=0.1).step()
    check(20)


@pytest.mark.skipif(not msfused.availability("cpu")[0], reason="the CPU backend (msfused._C) is not built")
@pytest.mark.parametrize("pos", ["first", None])
def test_projection_parts_cached_until_the_weight_changes(monkeypatch, pos):
    """The C++ operators' projection weight parts (x's slice, per-tap weights) are made once per version of the
    weight in calls without a gradient and passed in; remade after an in-place update or a dtype move; never
    made (the operator slices) where a gradient flows; each time with the naive module's numbers. No part is a
    view of the weight."""
    from msfused import _ops

    functional.PARAM_CACHE.clear()
    made = _count_calls(monkeypatch, _ops, "project_parts")
    project = dict(out_channels=3, kernel_size=3, bias=True)
    naive, fused = build_pair("psp", 4, dict(bins=(1, 2), branch_channels=2, norm="batch", input_position=pos,
                                             project=project), torch.float64)
    naive.eval(), fused.eval()
    x = torch.randn(2, 4, 7, 6, dtype=torch.float64)

    def check(expected, grad=False):
        with torch.set_grad_enabled(grad), msfused.use_backend("cpu"):
            out = fused(x)
            if x.dtype == torch.float64:
                assert norm_err(out, naive(x)) <= 1e-10
            else:  # SPEC.md's float32 rule: against the float64 reference (the naive module's own error aside)
                Checker(torch.float32, "projection parts")("output", out, reference64(naive)(x.double()),
                                                            own=naive(x))
        assert made[0] == expected

    check(1)
    check(1)
    with torch.no_grad():
        parts = functional._project_parts(x, fused.spec, fused.project.conv.weight)
    assert made[0] == 1 and all(p._base is None for p in parts) and len(parts) == 3
    assert (parts[0].numel() > 0) == (pos is not None)
    with torch.no_grad():  # in place (an optimizer step)
        for m in (naive, fused):
            m.project.conv.weight.mul_(-1.5)
    check(2)
    check(2, grad=True)  # a gradient flows: the operator slices the weight itself
    naive.float(), fused.float()  # a dtype move
    x = x.float()
    check(3)
    functional.PARAM_CACHE.clear()
