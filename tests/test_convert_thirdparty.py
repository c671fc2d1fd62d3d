"""msfused.convert on the real third-party pyramid blocks, loaded from each library's pinned release
(tests/_thirdparty.py downloads and caches them; skipped with the reason when the registry cannot be
reached): segmentation_models_pytorch's PSPModule and ASPPPooling, mmsegmentation's PPM, PSPHead and
UPerHead (mmcv's ConvModule from its sdist; BN, SyncBN, mmengine's _BatchNormXd), transformers' UperNet,
BEiT and Data2Vec pyramid pooling, torchvision's ASPPPooling, and a look-alike of hszhao/semseg's PPM.

For each, float64 and float32, eval and train: the converted module against an unconverted float64 copy
(forward, input and parameter gradients, running statistics), the fused operator really called (not the
reference composition), class / parameters / state_dict keys unchanged, checkpoints loading both ways, and
revert. Then: what is refused and why, SyncBatchNorm in training mode, hooks, deepcopy, torch.save and
torch.compile on a converted module."""

from __future__ import annotations

import copy
import io
import types
import warnings

import pytest
import torch
from torch import nn

import msfused
from msfused import thirdparty
from . import _thirdparty as tp
from .conftest import TOL, Checker, ZeroGradProbe, norm_err, randomize_


def _config(**kw):
    return types.SimpleNamespace(**kw)


# name -> (build() -> module, call(module, x) -> output, x shape, labels convert must report as converted)
def _cases():
    C, H, W = 8, 11, 13
    shape = (3, C, H, W)
    bn = dict(type="BN")

    def ppm_call(m, x):
        return m(x)

    def head(method):
        return lambda m, x: getattr(m, method)([x])

    return {
        "smp_psp": (lambda: tp.smp()["PSPModule"](C, sizes=(1, 2, 3, 6)), ppm_call, shape, ["smp PSPModule"]),
        "smp_psp_nonorm": (lambda: tp.smp()["PSPModule"](C, sizes=(1, 2, 3, 6), use_norm=False), ppm_call, shape,
                           ["smp PSPModule"]),
        "smp_psp_norm_dict": (lambda: tp.smp()["PSPModule"](C, sizes=(1, 3), use_norm=dict(
            type="batchnorm", eps=1e-3, momentum=0.3)), ppm_call, shape, ["smp PSPModule"]),
        "smp_decoder": (lambda: tp.smp()["PSPDecoder"]([3, C], out_channels=5, dropout=0.0),
                        lambda m, x: m([x]), shape, ["smp PSPModule", "smp PSPDecoder"]),
        "smp_aspp_pooling": (lambda: tp.smp()["ASPPPooling"](C, 5), ppm_call, shape, ["smp ASPPPooling"]),
        "torchvision_aspp_pooling": (lambda: tp.torchvision()["ASPPPooling"](C, 5), ppm_call, shape,
                                     ["torchvision ASPPPooling"]),
        "mmseg_ppm": (lambda: tp.mmseg()["PPM"]((1, 2, 3, 6), C, 4, conv_cfg=None, norm_cfg=bn,
                                                 act_cfg=dict(type="ReLU"), align_corners=False),
                      lambda m, x: torch.cat(m(x), 1), shape, ["mmseg PPM"]),
        "mmseg_psp_head": (lambda: tp.mmseg()["PSPHead"](in_channels=C, channels=4, num_classes=3, norm_cfg=bn,
                                                         align_corners=True, dropout_ratio=0.0),
                           head("_forward_feature"), shape, ["mmseg PPM", "mmseg PSPHead._forward_feature"]),
        "mmseg_psp_head_bnxd": (lambda: tp.mmseg()["revert_sync_batchnorm"](tp.mmseg()["PSPHead"](
            in_channels=C, channels=4, num_classes=3, norm_cfg=dict(type="SyncBN"), pool_scales=(1, 2, 6))),
            head("_forward_feature"), shape, ["mmseg PPM", "mmseg PSPHead._forward_feature"]),
        "mmseg_uper_head": (lambda: tp.mmseg()["UPerHead"](in_channels=[4, C], in_index=[0, 1], channels=4,
                                                           num_classes=3, norm_cfg=bn, act_cfg=dict(type="SiLU")),
                            head("psp_forward"), shape, ["mmseg PPM", "mmseg UPerHead.psp_forward"]),
        "transformers_upernet": (lambda: tp.transformers()["UperNetHead"](
            _config(pool_scales=(1, 2, 3, 6), hidden_size=4, num_labels=3), in_channels=[4, C]),
            head("psp_forward"), shape,
            ["transformers UperNetPyramidPoolingModule", "transformers UperNetHead.psp_forward"]),
        "transformers_beit": (lambda: tp.transformers()["BeitUperHead"](
            _config(pool_scales=(1, 2, 3, 6), hidden_size=C, num_labels=3)), head("psp_forward"), shape,
            ["transformers BeitPyramidPoolingModule", "transformers BeitUperHead.psp_forward"]),
        "transformers_data2vec": (lambda: tp.transformers()["Data2VecVisionUperHead"](
            _config(pool_scales=(1, 3), hidden_size=C, num_labels=3)), head("psp_forward"), shape,
            ["transformers Data2VecVisionPyramidPoolingModule", "transformers Data2VecVisionUperHead.psp_forward"]),
        "semseg_ppm": (lambda: tp.semseg_lookalike()["PPM"](C, 2, (1, 2, 3, 6)), ppm_call, shape, ["semseg PPM"]),
    }


CASES = _cases()


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", list(CASES))
def test_converts_and_matches(name, dtype, train, spies):
    build, call, shape, labels = CASES[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the libraries' own construction warnings
        module = randomize_(build()).to(dtype).train(train)
    if dtype != torch.float64:  # (conftest.Case: batch statistics over >= 8 values per channel in float32)
        shape = (8,) + tuple(shape[1:])
    reference = copy.deepcopy(module).double()
    fresh = copy.deepcopy(module)
    # The unconverted module in this dtype, in two memory formats (two rounding orders): conftest.Checker's
    # bound for tensors whose float32 value is ill-conditioned (a bin-1 norm over few values, a cancelling sum).
    formats = (torch.contiguous_format, torch.channels_last) if dtype != torch.float64 else ()
    owns = [copy.deepcopy(module) for _ in formats]
    params_before = [(n, p) for n, p in module.named_parameters()] + list(module.named_buffers())
    keys_before = list(module.state_dict())

    report = msfused.convert(module, report=True)
    assert report.model is module
    assert sorted(r.what for r in report if r.converted) == sorted(labels), report.summary()
    assert all(r.converted for r in report), report.summary()
    assert type(module) is type(reference)
    after = [(n, p) for n, p in module.named_parameters()] + list(module.named_buffers())
    assert [n for n, _ in after] == [n for n, _ in params_before]
    assert all(a is b for (_, a), (_, b) in zip(after, params_before)), "parameters or buffers were replaced"
    assert list(module.state_dict()) == keys_before

    x = (torch.randn(shape, dtype=torch.float64) * 2 + 0.5).requires_grad_()
    xd = x.detach().to(dtype).requires_grad_()
    out = call(module, xd)
    assert spies["fused"] == 1 and spies["reference"] == 0, spies
    # Gradients whose true value is 0 (a branch's bias before a batch-statistics norm, or reaching the
    # projection's through its 1x1 conv: smp's bin-1 branch) are rounding noise: checked against the
    # rounding bound that conftest.ZeroGradProbe measures on the unconverted float64 module.
    probe = ZeroGradProbe(reference)
    try:
        ref = call(reference, x)
    finally:
        probe.remove()
    g = torch.randn_like(ref)
    out.backward(g.to(dtype))
    ref.backward(g)
    own_runs = []
    for own, fmt in zip(owns, formats):
        xo = x.detach().to(dtype).contiguous(memory_format=fmt).requires_grad_()
        yo = call(own, xo)
        yo.backward(g.to(dtype))
        own_runs.append((yo, xo.grad, dict(own.named_parameters()), dict(own.named_buffers())))
    check = Checker(dtype, name)
    s = g.norm().item()
    check("output", out, ref, [r[0] for r in own_runs])
    check("grad x", xd.grad, x.grad, [r[1] for r in own_runs], s=s)
    zero = probe.param_names()
    for (n, p), (_, q) in zip(module.named_parameters(), reference.named_parameters()):
        if q.grad is None:
            assert p.grad is None, n
            continue
        assert p.grad is not None, n
        check(f"grad {n}", p.grad, q.grad, [r[2][n].grad for r in own_runs], s=s,
              zero_probe=probe if n in zero else None, zero_index=zero.get(n))
    for (n, a), (_, b) in zip(module.named_buffers(), reference.named_buffers()):
        if a.is_floating_point():
            check(n, a, b, [r[3][n] for r in own_runs])
        else:
            assert torch.equal(a, b), n
    tol = TOL[dtype]

    # Checkpoints load both ways, strictly.
    fresh.load_state_dict(module.state_dict())
    module.load_state_dict(fresh.state_dict())

    # revert: the library's computation again (the fused operator not called), same numbers.
    msfused.revert(module)
    assert not any(thirdparty.is_converted(m) for m in module.modules())
    module.eval(), reference.eval()
    with torch.no_grad():
        again = call(module, xd)
        assert spies["fused"] == 1
        assert norm_err(again, call(reference, x)) <= tol


@pytest.mark.parametrize("open_for", ["whole_batch", "part"])
def test_zero_gradient_probe_on_a_converted_decoder(open_for):
    """conftest.ZeroGradProbe on smp's PSPDecoder (float64, training): the bin-1 branch's conv bias, its ReLU
    open for the whole batch, shifts the projection's input by a constant per channel that the projection's
    batch-statistics norm removes: a true zero, found on the unconverted module; the converted module's
    gradient is within the rounding bound and one off by 1e-6 of s is not. Open for part of the batch
    (samples whose means differ in sign), its gradient is a real one: not a true zero."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = randomize_(tp.smp()["PSPDecoder"]([3, 8], out_channels=5, dropout=0.0)).double().train()
    x = torch.randn(3, 8, 11, 13, dtype=torch.float64)
    conv = module.psp.blocks[0].pool[1][0]
    with torch.no_grad():
        if open_for == "whole_batch":
            conv.bias.fill_(5.0)
        else:
            conv.weight.fill_(0.5), conv.bias.zero_()
            x += torch.tensor([2.0, -2.0, 2.0], dtype=torch.float64).view(3, 1, 1, 1)
    reference = copy.deepcopy(module)
    msfused.convert(module, report=True)
    probe = ZeroGradProbe(reference)
    g = torch.randn(3, 5, 11, 13, dtype=torch.float64)
    try:
        reference([x]).backward(g)
    finally:
        probe.remove()
    module([x]).backward(g)
    zero = probe.param_names()
    name = "psp.blocks.0.pool.1.0.bias"
    if open_for == "part":
        assert name not in zero and conv.bias.grad.abs().max() > 1e-3 * g.norm()
        return
    assert zero == {name: zero[name]}, zero
    s = g.norm().item()
    assert norm_err(conv.bias.grad, reference.psp.blocks[0].pool[1][0].bias.grad, s) <= 1e-8
    assert probe.within(zero[name], conv.bias.grad, TOL[torch.float64], s)
    assert not probe.within(zero[name], conv.bias.grad + 1e-6 * s, TOL[torch.float64], s)


def _mmseg_head(norm_cfg, **kw):
    return randomize_(tp.mmseg()["PSPHead"](in_channels=6, channels=3, num_classes=3, norm_cfg=norm_cfg,
                                              pool_scales=(1, 2, 3), **kw)).double()


@pytest.mark.parametrize("what", ["group_norm", "dilated", "leaky_relu", "subclass_forward", "instance_norm"])
def test_what_does_not_fit_is_left_and_reported(what, spies):
    x = torch.randn(2, 6, 9, 7, dtype=torch.float64)
    if what == "group_norm":
        module, match = _mmseg_head(dict(type="GN", num_groups=1)), "GroupNorm"
    elif what == "dilated":
        module, match = _mmseg_head(dict(type="BN")), "dilated"
        module.psp_modules[1][1].conv = nn.Conv2d(6, 3, 1, dilation=2, bias=False).double()
    elif what == "leaky_relu":
        module, match = _mmseg_head(dict(type="BN"), act_cfg=dict(type="LeakyReLU")), "LeakyReLU"
    elif what == "subclass_forward":
        class MyPSP(tp.smp()["PSPModule"]):
            def forward(self, x):
                return super().forward(x) * 2

        module, match = randomize_(MyPSP(6, sizes=(1, 2))).double(), "overrides forward"
    else:
        module, match = randomize_(tp.smp()["PSPModule"](6, sizes=(1, 2), use_norm="instancenorm")).double(), \
            "InstanceNorm2d"
    module.eval()
    expected = module(x) if not isinstance(module, tp.mmseg()["PSPHead"]) else module._forward_feature([x])
    report = msfused.convert(module, report=True)
    assert report and not any(r.converted for r in report), report.summary()
    assert all(match in r.reason for r in report), report.summary()
    assert not any(thirdparty.is_converted(m) for m in module.modules())
    got = module(x) if not isinstance(module, tp.mmseg()["PSPHead"]) else module._forward_feature([x])
    assert torch.equal(got, expected) and spies["fused"] == 0
    with pytest.warns(UserWarning, match="not converted"):
        msfused.convert(module)


def test_convert_says_when_there_is_nothing():
    with pytest.warns(UserWarning, match="nothing to convert"):
        msfused.convert(nn.Sequential(nn.Conv2d(3, 3, 1), nn.AdaptiveAvgPool2d(2)))


def test_sync_batchnorm(spies, monkeypatch):
    """mmseg's SyncBN configs: eval mode runs fused; training mode the reference (one warning under 'auto'),
    or an explicit fused backend raises."""
    module = _mmseg_head(dict(type="SyncBN"))
    reference = copy.deepcopy(module)
    assert all(r.converted for r in msfused.convert(module, report=True))
    x = torch.randn(2, 6, 9, 7, dtype=torch.float64)
    module.eval(), reference.eval()
    assert norm_err(module._forward_feature([x]), reference._forward_feature([x])) <= 1e-10
    assert spies["fused"] == 1
    module.train(), reference.train()
    monkeypatch.setattr(msfused.backends, "_warned", set())
    with pytest.warns(RuntimeWarning, match="SyncBatchNorm in training mode"):
        out = module._forward_feature([x])
    assert spies["fused"] == 1 and spies["reference"] == 1
    assert norm_err(out, reference._forward_feature([x])) <= 1e-10
    with msfused.use_backend("cpu"), pytest.raises(RuntimeError, match="SyncBatchNorm"):
        module._forward_feature([x])


def test_survives_deepcopy_save_hooks_and_replacement(spies):
    module = randomize_(tp.smp()["PSPModule"](6, sizes=(1, 2, 3))).double().eval()
    reference = copy.deepcopy(module)
    msfused.convert(module, report=True)
    x = torch.randn(2, 6, 8, 9, dtype=torch.float64)
    want = reference(x)

    twin = copy.deepcopy(module)
    buf = io.BytesIO()
    torch.save(module, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    for m in (twin, loaded):
        assert thirdparty.is_converted(m) and m.forward.module is m
        assert m.forward.plan.branches[0].conv is m.blocks[0].pool[1][0]  # its own conv, not the original's
        spies["fused"] = 0
        assert norm_err(m(x), want) <= 1e-10 and spies["fused"] == 1

    # A hook on the module itself runs around the fused forward.
    seen = []
    handle = module.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    spies["fused"] = 0
    module(x)
    assert seen == [want.shape] and spies["fused"] == 1
    handle.remove()
    # A hook on a submodule the library's forward calls: that forward runs, so the hook sees its call.
    inner = []
    handle = module.blocks[1].pool[1][0].register_forward_hook(lambda m, i, o: inner.append(o.shape))
    spies["fused"] = 0
    assert norm_err(module(x), want) <= 1e-10 and spies["fused"] == 0 and len(inner) == 1
    handle.remove()
    # A submodule replaced after convert is read again (here: still fits, so fused with the new one).
    new_norm = nn.BatchNorm2d(2).double().eval()
    module.blocks[2].pool[1][1] = new_norm
    reference.blocks[2].pool[1][1] = copy.deepcopy(new_norm)
    spies["fused"] = 0
    assert norm_err(module(x), reference(x)) <= 1e-10 and spies["fused"] == 1
    assert module.forward.plan.branches[2].norm is new_norm


@pytest.mark.slow
def test_torch_compile_runs_the_fused_operator():
    module = randomize_(tp.mmseg()["PSPHead"](in_channels=6, channels=3, num_classes=3, norm_cfg=dict(type="BN"),
                                                pool_scales=(1, 2, 3))).train()
    reference = copy.deepcopy(module)
    msfused.convert(module, report=True)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(module._forward_feature, fullgraph=True, backend=backend)
    x = torch.randn(2, 6, 9, 7)
    out = compiled([x])
    assert norm_err(out, reference._forward_feature([x])) <= 1e-5
    for (n, a), (_, b) in zip(module.named_buffers(), reference.named_buffers()):
        assert (norm_err(a, b) <= 1e-5) if a.is_floating_point() else torch.equal(a, b), n
    targets = [str(node.target) for g in graphs for node in g.graph.nodes]
    assert any("msfused" in t for t in targets), targets


def test_report_mixes_msfused_twins_and_third_party_blocks():
    """One convert call: msfused's naive twin swapped, a known third-party block converted, one refused; the
    report lists each with its path; without report=True the same summary is a warning."""
    model = nn.Sequential(msfused.NaivePyramidPooling(6, 2, bins=(1, 2)),
                          tp.smp()["PSPModule"](10, sizes=(1, 2)),
                          tp.smp()["PSPModule"](20, sizes=(1, 2), use_norm="instancenorm"))
    report = msfused.convert(copy.deepcopy(model), report=True)
    assert [(r.path, r.what, r.converted) for r in sorted(report)] == [
        ("0", "msfused NaivePyramidPooling", True), ("1", "smp PSPModule", True), ("2", "smp PSPModule", False)]
    assert type(report.model[0]) is msfused.PyramidPooling
    refused = [r for r in report if not r.converted]
    assert len(refused) == 1 and "InstanceNorm2d" in refused[0].reason, report.summary()
    with pytest.warns(UserWarning, match=r"2 of 3 known blocks converted(.|\n)*2: smp PSPModule: not converted"):
        msfused.convert(model)
    x = torch.randn(2, 6, 7, 9)
    model.eval()
    assert model(x).shape == (2, 40, 7, 9)


HEADS = {"mmseg_psp_head": "_forward_feature", "mmseg_uper_head": "psp_forward",
         "transformers_upernet": "psp_forward", "transformers_beit": "psp_forward",
         "transformers_data2vec": "psp_forward", "smp_decoder": "forward"}


@pytest.mark.parametrize("name", list(HEADS))
def test_heads_fuse_their_bottleneck_as_the_projection(name, spies):
    """The heads' PSP path (PPM + bottleneck; smp: PSPModule + Conv2dReLU) runs as one block with the
    bottleneck as its projection: no tensor of the concatenation's shape is allocated, forward or backward
    (watched as in tests/test_projection.py)."""
    from .test_projection import _WatchAllocations

    build, call, shape, _ = CASES[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = randomize_(build()).double().train()
    msfused.convert(module, report=True)
    plan = getattr(module, HEADS[name]).plan
    assert plan.spec.project is not None and plan.extra["project"].conv.out_channels == plan.spec.project.out_channels
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    cat_shape = (shape[0], plan.spec.concat_channels, shape[2], shape[3])
    with _WatchAllocations() as watch:
        out = call(module, x)
        out.sum().backward()
    assert spies["fused"] == 1 and cat_shape not in watch.shapes
    # A hook on the bottleneck's conv: the library's method runs (its PPM still fused), the hook sees the call.
    seen = []
    plan.extra["project"].conv.register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    module.eval()
    with torch.no_grad():
        call(module, x)
    assert seen == [cat_shape] and spies["fused"] == 2


def test_a_bottleneck_that_is_no_projection_runs_as_itself(spies):
    """A head whose bottleneck the kernels do not compute as a projection (here dilated) still fuses its
    PPM; the bottleneck runs as the module it is, on the fused block's output; smp's PSPDecoder with such a
    conv is reported as not converted (its PSPModule is)."""
    module = _mmseg_head(dict(type="BN")).eval()
    module.bottleneck.conv = nn.Conv2d(6 + 3 * 3, 3, 3, padding=2, dilation=2, bias=False).double()
    reference = copy.deepcopy(module)
    assert all(r.converted for r in msfused.convert(module, report=True))
    plan = module._forward_feature.plan
    assert plan.spec.project is None and "dilated" in plan.extra["project_refused"]
    x = torch.randn(2, 6, 9, 7, dtype=torch.float64)
    assert norm_err(module._forward_feature([x]), reference._forward_feature([x])) <= 1e-10
    assert spies["fused"] == 1
    decoder = randomize_(tp.smp()["PSPDecoder"]([3, 8], out_channels=5, dropout=0.0)).double().eval()
    decoder.conv[0] = nn.Conv2d(16, 5, 3, padding=2, dilation=2, bias=False).double()
    report = {r.what: r.reason for r in msfused.convert(decoder, report=True)}
    assert report["smp PSPModule"] is None and "dilated" in report["smp PSPDecoder"]
