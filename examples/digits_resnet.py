"""A multi-scale ResNet classifier on the handwritten digits scikit-learn ships (no download), trained with the
naive and the fused MultiScaleBlock side by side.

Each residual block is ``x + BN(conv1x1(MultiScaleBlock(x)))`` followed by a ReLU: the multi-scale block looks
at the 8x8 digit at scales 1, 2 and 4 (3x3 convolutions, BatchNorm, ReLU) and the 1x1 convolution brings
its branches back to the trunk's width. Both models start from the same weights and see the same batches;
the fused one is the naive one after ``msfused.convert``. Prints each model's test accuracy and training
time.

Needs scikit-learn for the data set (``pip install scikit-learn``, or ``pip install --no-build-isolation
".[examples]"`` in a clone of msfused); a few minutes on 2 CPU cores.

    python examples/digits_resnet.py                  # 8 epochs on all 1797 digits
    python examples/digits_resnet.py --epochs 1 --samples 600
"""

from __future__ import annotations

import argparse
import copy
import time
from typing import Dict, List, Optional

import torch
from torch import nn

import msfused


class ResidualMultiScale(nn.Module):
    def __init__(self, width: int, block_cls=msfused.NaiveMultiScaleBlock):
        super().__init__()
        self.multi = block_cls(width, width // 2, scales=(1, 2, 4), norm="batch", activation="relu",
                               input_position=None)
        self.proj = nn.Conv2d(self.multi.out_channels, width, 1, bias=False)
        self.norm = nn.BatchNorm2d(width)

    def forward(self, x):
        return torch.relu(x + self.norm(self.proj(self.multi(x))))


def build_model(width: int = 16, blocks: int = 2) -> nn.Module:
    """A small multi-scale ResNet for 1x8x8 images, 10 classes, with naive blocks."""
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
        *[ResidualMultiScale(width) for _ in range(blocks)],
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10),
    )


NEEDS_SKLEARN = (
    "examples/digits_resnet.py needs scikit-learn for its data set (sklearn.datasets.load_digits): "
    'pip install scikit-learn, or pip install --no-build-isolation ".[examples]" in a clone of msfused'
)


def load_digits(samples: Optional[int] = None, seed: int = 0):
    """(x_train, y_train, x_test, y_test): sklearn's 8x8 digits scaled to [0, 1], 75% / 25% split."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError:
        raise SystemExit(NEEDS_SKLEARN) from None

    data = sk_load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    if samples is not None:
        order = order[:samples]
    x, y = x[order], y[order]
    cut = int(0.75 * len(y))
    return x[:cut], y[:cut], x[cut:], y[cut:]


def warm_up(model: nn.Module, x: torch.Tensor) -> None:
    """One forward and backward on a copy (first calls pay one-off setup costs; the weights stay as they are)."""
    copy.deepcopy(model).train()(x).sum().backward()


def train(model: nn.Module, data, epochs: int, batch_size: int, seed: int) -> float:
    """Trains in place (Adam); returns the seconds spent in forward + backward + step."""
    x_train, y_train = data[0], data[1]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(seed)
    model.train()
    seconds = 0.0
    for _ in range(epochs):
        order = torch.randperm(len(y_train), generator=g)
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            if len(idx) < 2:
                continue  # BatchNorm in training mode needs more than one value per channel
            start = time.perf_counter()
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
            loss.backward()
            opt.step()
            seconds += time.perf_counter() - start
    return seconds


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return (model(x).argmax(1) == y).float().mean().item()


def main(argv: Optional[List[str]] = None) -> Dict[str, dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--samples", type=int, default=None, help="use the first N digits of a shuffle (default all 1797)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                   help="float64 makes the two runs agree to rounding (no float32 noise amplified by training)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    data = [t.to(dtype) if t.is_floating_point() else t for t in load_digits(args.samples, args.seed)]
    torch.manual_seed(args.seed)
    naive = build_model(args.width, args.blocks).to(dtype)
    fused = msfused.convert(copy.deepcopy(naive))  # the same weights, fused blocks
    assert sum(isinstance(m, msfused.MultiScaleBlock) for m in fused.modules()) == args.blocks
    for model in (naive, fused):
        warm_up(model, data[0][:args.batch_size])
    results = {}
    for name, model in (("naive", naive), ("fused", fused)):
        seconds = train(model, data, args.epochs, args.batch_size, args.seed)
        results[name] = dict(accuracy=accuracy(model, data[2], data[3]), train_seconds=seconds)
    print(f"digits: {len(data[1])} train / {len(data[3])} test images, {args.epochs} epochs, "
          f"{args.blocks} residual multi-scale blocks of width {args.width}, {args.dtype}")
    for name, r in results.items():
        print(f"  {name:5s}  test accuracy {100 * r['accuracy']:5.1f}%   training {r['train_seconds']:6.2f} s")
    print(f"  fused speedup (training): {results['naive']['train_seconds'] / results['fused']['train_seconds']:.2f}x")
    return results


if __name__ == "__main__":
    main()
