"""Module-level behaviour: state_dict round trips between the naive and fused twins, convert / revert on
nested models (parameters shared, outputs equal), convert refusing what the kernels do not compute, and
backend selection (use_backend, MSFUSED_BACKEND, availability)."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from torch import nn

import msfused
import msfused.functional as functional
from .conftest import FUSED, NAIVE, build_pair, make_input, norm_err, randomize_, true_zero_gradients

CONFIGS = [
    ("ms", dict(branch_channels=4)),
    ("ms", dict(branch_channels=(3, 5, 2), scales=(1, 2, 4), kernel_size=(1, 3, 5), bias=(True, False, True),
                norm=("batch", None, "batch"), input_position="last")),
    ("psp", dict(branch_channels=4)),
    ("psp", dict(branch_channels=4, bins=(1, 2, 3, 6), bias=(True, False, False, False),
                 norm=(None, "batch", "batch", "batch"), align_corners=True, input_position="last")),
    ("psp", dict(branch_channels=2, bins=((2, 5), 7), norm=None, bias=True, input_position=None)),
]
CONFIG_IDS = ["ms_default", "ms_per_branch", "psp_default", "psp_smp", "psp_pairs_nonorm"]


# ---------------------------------------------------------------------------------------------------
# state_dict
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("direction", ["naive_to_fused", "fused_to_naive"])
@pytest.mark.parametrize("kind,kwargs", CONFIGS, ids=CONFIG_IDS)
def test_state_dict_round_trip(kind, kwargs, direction):
    src_cls, dst_cls = (NAIVE[kind], FUSED[kind]) if direction == "naive_to_fused" else (FUSED[kind], NAIVE[kind])
    src = randomize_(src_cls(5, **kwargs)).double()
    dst = dst_cls(5, **kwargs).double()
    sd = src.state_dict()
    dst_sd = dst.state_dict()
    assert list(sd.keys()) == list(dst_sd.keys())
    assert [v.shape for v in sd.values()] == [v.shape for v in dst_sd.values()]
    assert [v.dtype for v in sd.values()] == [v.dtype for v in dst_sd.values()]
    result = dst.load_state_dict(sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for k, v in dst.state_dict().items():
        assert torch.equal(v, sd[k]), k
        assert v.data_ptr() != sd[k].data_ptr(), f"{k}: load_state_dict must copy, not alias"
    # And back again: the values survive the round trip exactly.
    back = src_cls(5, **kwargs).double()
    back.load_state_dict(dst.state_dict())
    for k, v in back.state_dict().items():
        assert torch.equal(v, sd[k]), k
    # Same numbers from either module.
    for train in (False, True):
        a, b = copy.deepcopy(src).train(train), copy.deepcopy(dst).train(train)
        x = make_input((2, 5, 13, 11))
        assert norm_err(a(x), b(x)) <= 1e-10
        for (k, u), (_, v) in zip(a.state_dict().items(), b.state_dict().items()):
            assert norm_err(u, v) <= 1e-10 if u.is_floating_point() else torch.equal(u, v), k
    assert dst.out_channels == src.out_channels


# ---------------------------------------------------------------------------------------------------
# convert / revert
# ---------------------------------------------------------------------------------------------------


class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.pyramid = nn.Sequential(nn.ReLU(), msfused.NaiveMultiScaleBlock(6, 4, scales=(1, 2, 3), norm="batch",
                                                                            down_mode="bilinear"))

    def forward(self, x):
        return self.pyramid(self.stem(x))


def nested_model() -> nn.Module:
    model = nn.Sequential(
        Inner(),
        msfused.NaivePyramidPooling(18, 3, bins=(1, 2, 3, 6), bias=(True, False, False, False),
                                    norm=(None, "batch", "batch", "batch"), input_position="last"),
        nn.Conv2d(18 + 12, 2, 1),
    )
    return randomize_(model).double()


def _blocks(model, classes):
    return [(name, m) for name, m in model.named_modules() if type(m) in classes]


def _tensors(block):
    """The block's own tensors (a projection folded in by convert is the former next module's)."""
    return [t for n, t in [*block.named_parameters(), *block.named_buffers()] if not n.startswith("project.")]


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_convert_revert_nested(train):
    model = nested_model().train(train)
    naive_blocks = _blocks(model, set(NAIVE.values()))
    assert [n for n, _ in naive_blocks] == ["0.pyramid.1", "1"]
    before = {name: _tensors(b) for name, b in naive_blocks}
    reference = copy.deepcopy(model)
    x = make_input((2, 3, 13, 11))
    head = model[2]

    assert msfused.convert(model) is model
    # Folding the next conv into a projection is opt-in (it renames state_dict keys): the head stays.
    assert model[1].project is None and model[2] is head
    assert not _blocks(model, set(NAIVE.values()))
    fused_blocks = _blocks(model, set(FUSED.values()))
    assert [(n, type(b)) for n, b in fused_blocks] == [("0.pyramid.1", msfused.MultiScaleBlock),
                                                       ("1", msfused.PyramidPooling)]
    for name, block in fused_blocks:
        after = _tensors(block)
        assert len(after) == len(before[name])
        assert all(a is b for a, b in zip(after, before[name])), f"{name}: parameters or buffers were copied"
        assert block.training == train
    out = model(x)
    ref = reference(x)
    assert norm_err(out, ref) <= 1e-10
    if train:  # the shared buffers were updated in place, like the naive module's
        for (n, a), (_, b) in zip(model.named_buffers(), reference.named_buffers()):
            assert (norm_err(a, b) <= 1e-10) if a.is_floating_point() else torch.equal(a, b), n
    # Gradients reach the shared parameters.
    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g)
    zero = true_zero_gradients(reference)
    assert len(zero) == (3 if train else 0)
    for (n, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        if n in zero:
            continue  # true gradient 0 (conv bias before a train-mode norm); checked in test_forward_backward
        assert p.grad is not None and norm_err(p.grad, q.grad, g.norm().item()) <= 1e-10, n
    # convert is idempotent; revert restores the naive classes, still sharing.
    assert msfused.convert(model) is model
    assert [(n, type(b)) for n, b in _blocks(model, set(FUSED.values()))] == [(n, type(b)) for n, b in fused_blocks]
    assert msfused.revert(model) is model
    assert [(n, type(b)) for n, b in _blocks(model, set(NAIVE.values()))] == [
        ("0.pyramid.1", msfused.NaiveMultiScaleBlock), ("1", msfused.NaivePyramidPooling)]
    assert not _blocks(model, set(FUSED.values()))
    for name, block in _blocks(model, set(NAIVE.values())):
        assert all(a is b for a, b in zip(_tensors(block), before[name]))
    model.eval(), reference.eval()
    with torch.no_grad():
        assert norm_err(model(x), reference(x)) <= 1e-10


def test_convert_a_block_itself():
    naive = randomize_(msfused.NaivePyramidPooling(4, 2)).double().eval()
    fused = msfused.convert(naive)
    assert type(fused) is msfused.PyramidPooling
    assert all(a is b for a, b in zip(_tensors(fused), _tensors(naive)))
    x = make_input((2, 4, 9, 9))
    assert norm_err(fused(x), naive(x)) <= 1e-10
    back = msfused.revert(fused)
    assert type(back) is msfused.NaivePyramidPooling
    assert all(a is b for a, b in zip(_tensors(back), _tensors(naive)))


@pytest.mark.parametrize("replace", ["batchnorm1d", "group_norm", "strided_conv", "dilated_conv", "grouped_conv",
                                     "reflect_padding"])
def test_convert_refuses_what_the_kernels_do_not_compute(replace):
    model = nested_model()
    block = model[1]
    if replace == "batchnorm1d":  # a _BatchNorm, but its own forward refuses 4-D input
        block.branches[1].norm = nn.BatchNorm1d(3)
        match = "BatchNorm1d, which does not take a 4-D input"
    elif replace == "group_norm":
        block.branches[2].norm = nn.GroupNorm(1, 3)
        match = "GroupNorm"
    else:
        conv_kwargs = dict(strided_conv=dict(stride=2), dilated_conv=dict(dilation=2, padding=2),
                           grouped_conv=dict(groups=2), reflect_padding=dict(padding_mode="reflect"))[replace]
        kw = dict(kernel_size=3, padding=1)
        kw.update(conv_kwargs)
        block.branches[0].conv = nn.Conv2d(18, 4, **kw)
        match = "conv"
    with pytest.raises(ValueError, match=match):
        msfused.convert(model)
    assert type(model[1]) is msfused.NaivePyramidPooling  # the refused block stays naive


class _BatchNormXd(nn.modules.batchnorm._BatchNorm):
    """mmengine's _BatchNormXd (what mmseg's revert_sync_batchnorm leaves): _BatchNorm without the input check."""

    def _check_input_dim(self, input):
        return


@pytest.mark.parametrize("norm", ["batchnorm_xd", "sync_batchnorm"])
def test_convert_twin_with_batchnorm_subclass(norm, spies):
    """SPEC.md: any _BatchNorm subclass that keeps _BatchNorm.forward is computed exactly; nn.SyncBatchNorm in
    eval mode like a BatchNorm, in training mode by the reference ('auto', one warning) or an explicit fused
    backend raises."""
    naive = randomize_(msfused.NaivePyramidPooling(5, 3, bins=(1, 2, 3))).double()
    for br in naive.branches:
        new = (_BatchNormXd if norm == "batchnorm_xd" else nn.SyncBatchNorm)(3, momentum=0.2).double()
        new.load_state_dict(br.norm.state_dict())
        br.norm = new
    fused = msfused.convert(copy.deepcopy(naive), report=True).model
    assert type(fused) is msfused.PyramidPooling
    x = make_input((2, 5, 9, 7))
    for train in (False, True):
        naive.train(train), fused.train(train)
        spies["fused"] = spies["reference"] = 0
        if norm == "sync_batchnorm" and train:
            with msfused.use_backend("cpu"), pytest.raises(RuntimeError, match="SyncBatchNorm in training mode"):
                fused(x)
            functional.backends._warned.clear()
            with pytest.warns(RuntimeWarning, match="SyncBatchNorm"):
                out = fused(x)
            assert spies == {"fused": 0, "reference": 1}
        else:
            out = fused(x)
            assert spies == {"fused": 1, "reference": 0}
        assert norm_err(out, naive(x)) <= 1e-10
        for (n, a), (_, b) in zip(fused.named_buffers(), naive.named_buffers()):
            assert (norm_err(a, b) <= 1e-10) if a.is_floating_point() else torch.equal(a, b), n


@pytest.mark.parametrize("norm", ["sync_batchnorm_after_convert", "group_norm_assigned"])
def test_fused_block_with_a_foreign_norm_is_not_silently_wrong(norm):
    """A fused block whose norm became something it does not compute (nn.SyncBatchNorm.convert_sync_batchnorm
    run after msfused.convert, or a norm assigned by hand) must raise a clear error or compute that norm:
    SPEC.md allows no silently wrong output."""
    naive = randomize_(msfused.NaiveMultiScaleBlock(3, 4, norm="batch")).double().eval()
    fused = msfused.convert(copy.deepcopy(naive))
    if norm == "sync_batchnorm_after_convert":
        fused = nn.SyncBatchNorm.convert_sync_batchnorm(fused)
        naive = nn.SyncBatchNorm.convert_sync_batchnorm(naive)
        assert isinstance(fused.branches[0].norm, nn.SyncBatchNorm)
    else:
        for block in (naive, fused):
            block.branches[1].norm = nn.GroupNorm(2, 4).double()
    x = make_input((2, 3, 8, 8))
    try:
        out = fused(x)
    except (ValueError, TypeError, RuntimeError) as e:
        assert "norm" in str(e) or "Norm" in str(e), f"error does not name the norm: {e}"
        return
    assert norm_err(out, naive(x)) <= 1e-10, "the fused block silently ignored its norm"


@pytest.mark.parametrize("position,extra", [("first", 5), ("last", 5), (None, 0)])
def test_out_channels(position, extra):
    for cls in (msfused.MultiScaleBlock, msfused.NaiveMultiScaleBlock):
        m = cls(5, (2, 3, 4), input_position=position)
        assert m.out_channels == 9 + extra
        assert m(make_input((1, 5, 8, 8), torch.float32)).shape == (1, 9 + extra, 8, 8)
    for cls in (msfused.PyramidPooling, msfused.NaivePyramidPooling):
        m = cls(5, 3, bins=(1, 2), input_position=position, norm=None)
        assert m.out_channels == 6 + extra


# ---------------------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------------------


def test_default_backend_on_cpu_is_fused(spies):
    assert msfused.availability("cpu") == (True, "")
    naive, fused = build_pair("ms", 3, dict(norm="batch"))
    x = make_input((2, 3, 8, 8))
    out = fused(x)
    assert spies == {"fused": 1, "reference": 0}
    assert norm_err(out, naive(x)) <= 1e-10


@pytest.mark.parametrize("name", ["reference", "cpu", "auto"])
def test_use_backend(spies, name):
    naive, fused = build_pair("psp", 3, {})
    x = make_input((2, 3, 8, 8))
    with msfused.use_backend(name):
        out = fused(x)
    assert spies == ({"fused": 0, "reference": 1} if name == "reference" else {"fused": 1, "reference": 0})
    assert norm_err(out, naive(x)) <= 1e-10


def test_env_var_and_precedence(spies, monkeypatch):
    naive, fused = build_pair("ms", 3, {})
    x = make_input((2, 3, 8, 8))
    monkeypatch.setenv("MSFUSED_BACKEND", "reference")
    fused(x)
    assert spies == {"fused": 0, "reference": 1}
    with msfused.use_backend("cpu"):  # use_backend wins over the environment variable
        fused(x)
    assert spies == {"fused": 1, "reference": 1}
    monkeypatch.setenv("MSFUSED_BACKEND", "bogus")
    with pytest.raises(ValueError, match="MSFUSED_BACKEND"):
        fused(x)


def test_use_backend_is_thread_local_and_restored(spies):
    _, fused = build_pair("ms", 3, {})
    x = make_input((2, 3, 8, 8))
    seen = []
    with msfused.use_backend("reference"):
        t = threading.Thread(target=lambda: seen.append(fused(x)))
        t.start()
        t.join()
    assert len(seen) == 1 and spies == {"fused": 1, "reference": 0}  # the other thread used 'auto'
    with pytest.raises(KeyError):
        with msfused.use_backend("reference"):
            raise KeyError("inside")
    fused(x)
    assert spies == {"fused": 2, "reference": 0}


@pytest.mark.parametrize("name", ["cuda", "triton"])
def test_unavailable_backend_raises_with_reason(name):
    ok, why = msfused.availability(name)
    if ok:
        pytest.skip(f"backend {name!r} is available here")
    assert why
    _, fused = build_pair("ms", 3, {})
    x = make_input((2, 3, 8, 8))
    before = x.clone()
    with msfused.use_backend(name):
        with pytest.raises(RuntimeError, match=name) as info:
            fused(x)
    assert why in str(info.value)
    assert torch.equal(x, before)


def test_availability_names():
    assert msfused.BACKENDS == ("auto", "cpu", "cuda", "triton", "reference")
    for name in msfused.BACKENDS:
        ok, why = msfused.availability(name)
        assert isinstance(ok, bool) and isinstance(why, str) and (ok == (why == ""))
    with pytest.raises(ValueError, match="backend"):
        msfused.availability("gpu")


def test_autocast_runs_the_fused_backend(spies):
    """Under autocast 'auto' runs the fused path (numbers and dtypes against the naive module: test_autocast)."""
    naive, fused = build_pair("ms", 3, dict(norm="batch", down_mode="bilinear"), torch.float32)
    x = make_input((2, 3, 9, 8), torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fused(x)
        ref = naive(x)
    assert spies == {"fused": 1, "reference": 0}
    assert out.dtype == ref.dtype
