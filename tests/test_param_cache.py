"""The functional layer's parameter cache (issue 11): an eval-mode norm's fold is computed once and reused while
its tensors stay the same, recomputed after load_state_dict, ``.data =``, in-place updates and dtype moves,
and never cached where a gradient flows through it (the fold is differentiable); each time with the naive
module's numbers."""

from __future__ import annotations

import pytest
import torch

from msfused import functional

from .conftest import build_pair, norm_err, randomize_


@pytest.fixture
def folds(monkeypatch):
    """Counts the folds computed."""
    count = [0]
    real = functional._fold_norm

    def counting(norm):
        count[0] += 1
        return real(norm)

    monkeypatch.setattr(functional, "_fold_norm", counting)
    functional.PARAM_CACHE.clear()
    yield count
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
