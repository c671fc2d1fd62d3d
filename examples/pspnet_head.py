"""A PSPNet-style segmentation model (a small strided backbone, the pyramid pooling module with bins 1, 2, 3, 6,
a 3x3 bottleneck and a per-pixel classifier upsampled to the image) converted with ``msfused.convert``:
the outputs before and after are equal (SPEC.md's tolerance), in eval and in train mode, and each is timed.

    python examples/pspnet_head.py                    # 2 x 3 x 256 x 256 images
    python examples/pspnet_head.py --size 64 --repeats 2
"""

from __future__ import annotations

import argparse
import copy
import time
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

import msfused


def conv_bn_relu(cin: int, cout: int, k: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class PSPNet(nn.Module):
    """Backbone (output stride 8) -> NaivePyramidPooling -> bottleneck -> classifier -> upsample."""

    def __init__(self, classes: int = 21, channels: int = 64):
        super().__init__()
        self.backbone = nn.Sequential(conv_bn_relu(3, channels // 2, stride=2), conv_bn_relu(channels // 2, channels, stride=2),
                                      conv_bn_relu(channels, channels, stride=2), conv_bn_relu(channels, channels))
        # As in mmsegmentation / segmentation_models_pytorch: 1x1 convs, BatchNorm, ReLU, bilinear, x first.
        self.ppm = msfused.NaivePyramidPooling(channels, channels // 4, bins=(1, 2, 3, 6))
        self.bottleneck = conv_bn_relu(self.ppm.out_channels, channels)
        self.classifier = nn.Conv2d(channels, classes, 1)

    def forward(self, image):
        features = self.backbone(image)
        logits = self.classifier(self.bottleneck(self.ppm(features)))
        return F.interpolate(logits, size=image.shape[-2:], mode="bilinear", align_corners=False)


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    """SPEC.md's norm-wise error of ``a`` against ``b``."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def main(argv: Optional[List[str]] = None) -> Dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=256, help="image height and width")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--channels", type=int, default=64)
    p.add_argument("--classes", type=int, default=21)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = PSPNet(args.classes, args.channels)
    with torch.no_grad():  # non-trivial BatchNorm statistics, as after training
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    image = torch.randn(args.batch, 3, args.size, args.size)
    before = copy.deepcopy(model)  # the naive model, kept to compare
    naive_ppm = model.ppm
    assert msfused.convert(model) is model and type(model.ppm) is msfused.PyramidPooling
    # convert swaps the block in place, sharing its parameters and buffers (no copies)
    assert all(a is b for a, b in zip(model.ppm.state_dict(keep_vars=True).values(),
                                      naive_ppm.state_dict(keep_vars=True).values()))
    results = {}
    model.eval(), before.eval()
    with torch.no_grad():
        out_naive, out_fused = before(image), model(image)
        results["eval_err"] = _err(out_fused, out_naive)
        results["eval_naive_ms"] = 1e3 * _time(lambda: before(image), args.repeats)
        results["eval_fused_ms"] = 1e3 * _time(lambda: model(image), args.repeats)
        results["ppm_err"] = _err(model.ppm(before.backbone(image)), before.ppm(before.backbone(image)))
    # Train mode: batch statistics, the same output, and the same running statistics afterwards.
    model.train(), before.train()
    with torch.no_grad():
        results["train_err"] = _err(model(image), before(image))
    results["running_stats_err"] = max(_err(a, b) for (n, a), (_, b) in zip(model.named_buffers(), before.named_buffers())
                                       if "running" in n)
    print(f"PSPNet head on {args.batch} x 3 x {args.size} x {args.size} images: {args.channels} channels at 1/8 "
          f"resolution, bins (1, 2, 3, 6), {args.classes} classes")
    print(f"  outputs before / after msfused.convert: err {results['eval_err']:.2e} (eval), "
          f"{results['train_err']:.2e} (train), running statistics {results['running_stats_err']:.2e}")
    print(f"  eval forward: naive {results['eval_naive_ms']:.2f} ms, fused {results['eval_fused_ms']:.2f} ms "
          f"(the whole model; the pyramid pooling is one part of it)")
    return results


if __name__ == "__main__":
    main()
