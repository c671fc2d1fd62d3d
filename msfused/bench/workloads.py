"""The benchmark workloads of WORKLOADS.md, and how to build one.

Each :class:`Workload` is a real multi-scale block with its exact configuration, its full batch size ``n``
(what GPU figures use) and ``cpu_n``, the batch cut so that one naive plus one fused inference call take
well under a second or so on a small (2-core) CPU. :func:`build` makes the naive module, the fused module
with identical weights, and an input.
"""

from __future__ import annotations

import dataclasses
import types
from typing import Any, Dict, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import nn

import msfused


@dataclasses.dataclass(frozen=True, eq=False)
class Workload:
    """One row of WORKLOADS.md: a block configuration, an input shape and the batch sizes to run."""

    name: str
    source: str  # the model it is taken from
    block: str  # 'pyramid_pooling' (bins) or 'multi_scale' (factors)
    n: int  # full batch size
    cpu_n: int  # batch size for CPU runs
    channels: int
    height: int
    width: int
    config: Mapping[str, Any]  # constructor keywords besides in_channels

    @property
    def naive_class(self) -> type:
        return msfused.NaivePyramidPooling if self.block == "pyramid_pooling" else msfused.NaiveMultiScaleBlock

    @property
    def fused_class(self) -> type:
        return msfused.PyramidPooling if self.block == "pyramid_pooling" else msfused.MultiScaleBlock

    def default_n(self, device: Union[str, torch.device]) -> int:
        """The batch size a run on ``device`` uses unless told otherwise: ``cpu_n`` on a CPU, else ``n``."""
        return self.cpu_n if torch.device(device).type == "cpu" else self.n

    def input_shape(self, n: int) -> Tuple[int, int, int, int]:
        return (n, self.channels, self.height, self.width)

    def make_naive(self, device: Union[str, torch.device, None] = None) -> nn.Module:
        """The naive module with its default initialisation (``device='meta'`` for shapes only)."""
        with torch.device(device if device is not None else "cpu"):
            return self.naive_class(self.channels, **self.config)

    def describe(self) -> str:
        """A one-line summary of the configuration, for listings."""
        options = ", ".join(f"{k}={v!r}" for k, v in self.config.items())
        return (
            f"{self.name}: N={self.n} (CPU {self.cpu_n}), C={self.channels}, {self.height}x{self.width}, "
            f"{self.naive_class.__name__}({options})  [{self.source}]"
        )


def _workload(name: str, source: str, block: str, n: int, cpu_n: int, chw: Tuple[int, int, int], **config) -> Workload:
    c, h, w = chw
    return Workload(name, source, block, n, cpu_n, c, h, w, types.MappingProxyType(config))


# The table of WORKLOADS.md. cpu_n: small enough that one naive plus one fused inference call stay under
# about half a second on 2 cores (psp_mmseg, the largest, takes ~0.35 s at N=2); blocks whose bin-1 branch
# has a BatchNorm need N >= 2 in training mode (one value per channel otherwise).
WORKLOADS: Dict[str, Workload] = {
    w.name: w
    for w in (
        _workload(
            "psp_mmseg", "mmsegmentation PSPHead (pspnet_r50-d8)", "pyramid_pooling", 8, 2, (2048, 64, 64),
            branch_channels=512, bins=(1, 2, 3, 6), kernel_size=1, bias=False, norm="batch", activation="relu",
            up_mode="bilinear", align_corners=False, input_position="first",
        ),
        _workload(
            "psp_smp", "segmentation_models_pytorch PSPNet (resnet34 encoder, depth 3)", "pyramid_pooling", 16, 4,
            (128, 64, 64),
            branch_channels=32, bins=(1, 2, 3, 6), kernel_size=1, bias=(True, False, False, False),
            norm=(None, "batch", "batch", "batch"), activation="relu", up_mode="bilinear", align_corners=True,
            input_position="last",
        ),
        _workload(
            "aspp_pool", "DeepLabV3 ASPP image-pooling branch", "pyramid_pooling", 8, 2, (2048, 64, 64),
            branch_channels=256, bins=(1,), kernel_size=1, bias=False, norm="batch", activation="relu",
            up_mode="bilinear", align_corners=False, input_position=None,
        ),
        _workload(
            "pyramid_seed", "the multi-scale CNN block (scales 1, 2, 4)", "multi_scale", 16, 2, (64, 128, 128),
            branch_channels=64, scales=(1, 2, 4), down_mode="avg", kernel_size=3, bias=True, norm=None,
            activation="relu", up_mode="bilinear", align_corners=False, input_position="first",
        ),
        _workload(
            "pyramid_wide", "the multi-scale block, wide (compute-bound)", "multi_scale", 8, 2, (256, 64, 64),
            branch_channels=128, scales=(1, 2, 4), down_mode="avg", kernel_size=3, bias=True, norm=None,
            activation="relu", up_mode="bilinear", align_corners=False, input_position="first",
        ),
        _workload(
            "stem_pyramid", "multi-scale input stem on images", "multi_scale", 32, 4, (3, 224, 224),
            branch_channels=32, scales=(1, 2, 4), down_mode="bilinear", kernel_size=3, bias=True, norm=None,
            activation="relu", up_mode="bilinear", align_corners=False, input_position=None,
        ),
        _workload(
            "psp_small", "launch-bound case", "pyramid_pooling", 8, 8, (64, 32, 32),
            branch_channels=16, bins=(1, 2, 3, 6), kernel_size=1, bias=False, norm="batch", activation="relu",
            up_mode="bilinear", align_corners=False, input_position="first",
        ),
        # The heads: the block and the convolution that consumes it, as the block's projection (the naive
        # twin builds the concatenation and convolves it, as the models' own code does). psp_head_mmseg's
        # cpu_n is 2 because its bin-1 BatchNorm needs N >= 2 in training; its inference figure is also
        # taken at N = 1 (--n 1).
        _workload(
            "psp_head_mmseg", "mmsegmentation PSPHead, whole (psp_mmseg + its bottleneck)", "pyramid_pooling", 8, 2,
            (2048, 64, 64),
            branch_channels=512, bins=(1, 2, 3, 6), kernel_size=1, bias=False, norm="batch", activation="relu",
            up_mode="bilinear", align_corners=False, input_position="first",
            project=dict(out_channels=512, kernel_size=3, bias=False, norm="batch", activation="relu"),
        ),
        _workload(
            "psp_decoder_smp", "segmentation_models_pytorch PSPDecoder, whole (psp_smp + its Conv2dReLU)",
            "pyramid_pooling", 16, 4, (128, 64, 64),
            branch_channels=32, bins=(1, 2, 3, 6), kernel_size=1, bias=(True, False, False, False),
            norm=(None, "batch", "batch", "batch"), activation="relu", up_mode="bilinear", align_corners=True,
            input_position="last",
            project=dict(out_channels=512, kernel_size=1, bias=False, norm="batch", activation="relu"),
        ),
    )
}


def select(names: Optional[Sequence[str]] = None) -> list:
    """The workloads called ``names`` (all of them, in table order, when None); unknown names raise."""
    if not names:
        return list(WORKLOADS.values())
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown:
        raise ValueError(f"unknown workload(s) {', '.join(unknown)}; known: {', '.join(WORKLOADS)}")
    return [WORKLOADS[n] for n in names]


class Built(NamedTuple):
    """A naive module, the fused module with the same weights, and an input (all on one device and dtype)."""

    naive: nn.Module
    fused: nn.Module
    x: torch.Tensor


def _randomise(module: nn.Module, generator: torch.Generator) -> None:
    """Reproducible weights, and BatchNorm running statistics and affine parameters away from their
    defaults (0, 1), so that eval-mode norms do real work."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.Conv2d):
                fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
                m.weight.normal_(0.0, fan_in ** -0.5, generator=generator)
                if m.bias is not None:
                    m.bias.normal_(0.0, 0.1, generator=generator)
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=generator)
                m.bias.normal_(0.0, 0.1, generator=generator)
                m.running_mean.normal_(0.0, 0.1, generator=generator)
                m.running_var.uniform_(0.5, 2.0, generator=generator)


def build(
    workload: Workload,
    n: Optional[int] = None,
    dtype: torch.dtype = torch.float32,
    device: Union[str, torch.device] = "cpu",
    seed: int = 0,
) -> Built:
    """The naive and fused modules of ``workload`` with identical, reproducible weights (random BatchNorm
    statistics and affine parameters), in eval mode, and a standard-normal input of batch ``n`` (default:
    ``workload.default_n(device)``), all in ``dtype`` on ``device``."""
    n = workload.default_n(device) if n is None else n
    generator = torch.Generator().manual_seed(seed)
    naive = workload.make_naive()
    _randomise(naive, generator)
    fused = workload.fused_class(workload.channels, **workload.config)
    fused.load_state_dict(naive.state_dict())
    # Drawn on the CPU so the numbers do not depend on the device's generator.
    x = torch.randn(workload.input_shape(n), generator=generator)
    return Built(
        naive.to(device=device, dtype=dtype).eval(),
        fused.to(device=device, dtype=dtype).eval(),
        x.to(device=device, dtype=dtype),
    )
