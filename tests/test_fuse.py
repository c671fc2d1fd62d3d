"""msfused.fuse: hand-written multi-scale blocks (several honest styles of the same block) traced with
torch.fx and computed by the fused operator: same numbers as the original (forward, input and parameter
gradients, running statistics; float64), parameters shared, state_dict keys the original's, the fused
operator really called; scale_factor resizes checked at run time (fallback to the original composition when
they do not divide the map); what does not fit (dilation, groups, strides, padding modes, untraceable code)
returned unchanged with the reason."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import msfused
from .conftest import norm_err, randomize_


class FunctionalPSP(nn.Module):
    """The seeds' style: functional pools, resizes and activation; convs and norms in ModuleLists."""

    def __init__(self, c=6, cb=3, bins=(1, 2, 3, 6)):
        super().__init__()
        self.bins = bins
        self.convs = nn.ModuleList(nn.Conv2d(c, cb, 1, bias=False) for _ in bins)
        self.norms = nn.ModuleList(nn.BatchNorm2d(cb) for _ in bins)

    def forward(self, x):
        outs = [x]
        for b, conv, norm in zip(self.bins, self.convs, self.norms):
            y = F.relu(norm(conv(F.adaptive_avg_pool2d(x, b))))
            outs.append(F.interpolate(y, size=x.shape[2:], mode="bilinear", align_corners=False))
        return torch.cat(outs, dim=1)


class ModulePSP(nn.Module):
    """nn.Sequential branches of modules (inplace ReLU), x last, align_corners=True, size from x.size()."""

    def __init__(self, c=6, cb=2, bins=(1, 3, (2, 5))):
        super().__init__()
        self.stages = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(b), nn.Conv2d(c, cb, 1), nn.BatchNorm2d(cb), nn.ReLU(inplace=True))
            for b in bins)

    def forward(self, x):
        h = x.size()[2:]
        return torch.cat([F.interpolate(s(x), h, mode="bilinear", align_corners=True) for s in self.stages] + [x], 1)


class ScalePyramid(nn.Module):
    """A factor pyramid written with scale_factor: avg_pool2d down, nn.Upsample(scale_factor) up, a
    full-resolution branch without resizes, SiLU; no norm on one branch."""

    def __init__(self, c=4, cb=3, scales=(1, 2, 4), mode="nearest"):
        super().__init__()
        self.scales = scales
        self.convs = nn.ModuleList(nn.Conv2d(c, cb, 3, padding=1) for _ in scales)
        self.norms = nn.ModuleList(nn.BatchNorm2d(cb) if s != 2 else nn.Identity() for s in scales)
        self.ups = nn.ModuleList(nn.Upsample(scale_factor=s, mode=mode) for s in scales)

    def forward(self, x):
        outs = []
        for s, conv, norm, up in zip(self.scales, self.convs, self.norms, self.ups):
            z = F.avg_pool2d(x, s) if s > 1 else x
            a = F.silu(norm(conv(z)))
            outs.append(up(a) if s > 1 else a)
        return torch.cat([x] + outs, 1)


class BilinearDown(nn.Module):
    """Down by F.interpolate(scale_factor=1/s), up by size=x.shape[-2:], GELU module, no x in the output."""

    def __init__(self, c=4, cb=2):
        super().__init__()
        self.b2 = nn.Sequential(nn.Conv2d(c, cb, 3, padding=1, bias=False), nn.BatchNorm2d(cb), nn.GELU())
        self.b4 = nn.Sequential(nn.Conv2d(c, cb, 1, bias=False), nn.BatchNorm2d(cb), nn.GELU())

    def forward(self, x):
        size = x.shape[-2:]
        y2 = F.interpolate(self.b2(F.interpolate(x, scale_factor=0.5, mode="bilinear")), size=size, mode="bilinear")
        y4 = F.interpolate(self.b4(F.interpolate(x, scale_factor=0.25, mode="bilinear")), size=size, mode="bilinear")
        return torch.cat((y2, y4), dim=1)


STYLES = {"functional": (FunctionalPSP, (2, 6, 11, 13)), "modules": (ModulePSP, (2, 6, 9, 10)),
          "scale_factor": (ScalePyramid, (2, 4, 12, 8)), "bilinear_down": (BilinearDown, (3, 4, 16, 12))}


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("style", list(STYLES))
def test_fuse_styles(style, train, spies):
    cls, shape = STYLES[style]
    original = randomize_(cls()).double().train(train)
    reference = copy.deepcopy(original)
    gm = msfused.fuse(original)
    assert isinstance(gm, torch.fx.GraphModule)
    assert any(n.target is msfused.fx_fuse.pyramid for n in gm.graph.nodes)
    assert list(gm.state_dict()) == [k for k in original.state_dict() if k in gm.state_dict()]
    assert set(gm.state_dict()) == set(original.state_dict())
    for name, p in gm.named_parameters():
        assert p is original.get_parameter(name), name
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    out = gm(x)
    assert spies["fused"] == 1
    ref = reference(x_ref)
    assert norm_err(out, ref) <= 1e-10
    g = torch.randn_like(ref)
    out.backward(g)
    ref.backward(g)
    assert norm_err(x.grad, x_ref.grad, g.norm()) <= 1e-10
    s = g.norm().item()
    for (n, p), (_, q) in zip(original.named_parameters(), reference.named_parameters()):
        if train and n.endswith("bias") and q.grad.norm() <= 1e-9 * s:
            # a conv bias before a training-mode BatchNorm: true gradient 0, both are rounding noise
            assert (p.grad - q.grad).norm() <= 1e-9 * s, n
            continue
        assert norm_err(p.grad, q.grad, s) <= 1e-10, n
    for (n, a), (_, b) in zip(original.named_buffers(), reference.named_buffers()):
        assert (norm_err(a, b) <= 1e-10) if a.is_floating_point() else torch.equal(a, b), n


@pytest.mark.parametrize("style,shape", [("scale_factor", (2, 4, 10, 8)), ("bilinear_down", (2, 4, 14, 12))])
def test_scale_factor_that_does_not_divide_falls_back(style, shape, spies):
    """scale_factor equals SPEC's size= resize only when it divides the map exactly: otherwise the original
    composition runs (checked at run time)."""
    original = randomize_(STYLES[style][0]()).double()
    gm = msfused.fuse(copy.deepcopy(original))
    x = torch.randn(shape, dtype=torch.float64)
    if style == "scale_factor":  # 10 rows at scale 4: nearest up gives 8 rows, the original's cat raises
        with pytest.raises(RuntimeError):
            original(x)
        with pytest.raises(RuntimeError):
            gm(x)
    else:  # 14 rows at 1/4: floor(3.5) = 3 rows sampled at scale 4 (not 14/3): the composition, not fused
        assert spies["fused"] == 0
        assert norm_err(gm(x), original(x)) <= 1e-10


@pytest.mark.parametrize("what,match", [
    ("dilation", "dilated"), ("groups", "groups"), ("stride", "strided"), ("padding_mode", "pads with 'reflect'"),
    ("untraceable", "cannot be traced"), ("no_pattern", "no multi-scale block")])
def test_refused_unchanged_with_reason(what, match):
    module = FunctionalPSP()
    kw = dict(dilation=dict(dilation=2, padding=2), groups=dict(groups=3, padding=1), stride=dict(stride=2, padding=1),
              padding_mode=dict(padding=1, padding_mode="reflect")).get(what)
    if kw is not None:
        module.convs[1] = nn.Conv2d(6, 3, 3, bias=False, **kw)
    elif what == "untraceable":
        class DataDependent(FunctionalPSP):
            def forward(self, x):
                return super().forward(x) if x.sum() > 0 else x

        module = DataDependent()
    else:
        module = nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU())
    with pytest.warns(UserWarning, match=match):
        assert msfused.fuse(module) is module
