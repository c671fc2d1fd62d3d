"""Third-party model code for the convert tests, from the package registry at test time.

Each library's pinned release is downloaded once (``pip download --no-deps``) into a cache outside the
repository (``MSFUSED_TEST_WHEELS``, default ``~/.cache/msfused-test-wheels``); the module's own source
file is read from the wheel (or sdist) and executed under its real dotted module name, so that
``msfused.thirdparty.TABLE`` finds its classes. Only the imports those files need and that cannot load
here (mmcv's compiled parts, mmengine's and transformers' dependency trees, torchvision's C++ ops built
for another torch) are stubbed: a registry, a base class, decorators. When the registry cannot be reached
the tests skip with the reason.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.machinery
import os
import subprocess
import sys
import tarfile
import types
import zipfile
from pathlib import Path
from typing import Dict, Optional

import pytest
import torch
from packaging.version import Version
from torch import nn

CACHE = Path(os.environ.get("MSFUSED_TEST_WHEELS", "~/.cache/msfused-test-wheels")).expanduser()

#: requirement -> file name in the cache (pip's own name for the download)
PINS = {
    "smp": ("segmentation_models_pytorch==0.6.0", "segmentation_models_pytorch-0.6.0-py3-none-any.whl"),
    "mmseg": ("mmsegmentation==1.2.2", "mmsegmentation-1.2.2-py3-none-any.whl"),
    "mmengine": ("mmengine==0.10.7", "mmengine-0.10.7-py3-none-any.whl"),
    "mmcv": ("mmcv==2.2.0", "mmcv-2.2.0.tar.gz"),  # no wheel for this platform: the source distribution
    "transformers": ("transformers==5.24.0", "transformers-5.24.0-py3-none-any.whl"),
    "torchvision": ("torchvision==0.28.0", "torchvision-0.28.0-cp311-cp311-manylinux_2_28_x86_64.whl"),
}


@functools.lru_cache(maxsize=None)
def archive(lib: str) -> Path:
    """The cached download of ``lib``'s pinned release, downloaded first if needed (skips if impossible)."""
    requirement, filename = PINS[lib]
    path = CACHE / filename
    if path.exists():
        return path
    CACHE.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
           "-d", str(CACHE), requirement]
    env = dict(os.environ)
    if filename.endswith(".tar.gz"):
        # An sdist: pip prepares its metadata; mmcv's setup.py needs pkg_resources (setuptools < 70).
        constraint = CACHE / "sdist-build-constraints.txt"
        constraint.write_text("setuptools<70\n")
        cmd[4:4] = ["--no-binary", ":all:", "--use-pep517"]
        env["PIP_CONSTRAINT"] = str(constraint)
    else:
        cmd[4:4] = ["--only-binary", ":all:", "--python-version", "3.11", "--platform", "manylinux_2_28_x86_64"]
    try:
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"cannot download {requirement} from the package registry: {e}")
    if run.returncode != 0 or not path.exists():
        tail = (run.stderr or run.stdout).strip().splitlines()[-1:] or ["no output"]
        pytest.skip(f"cannot download {requirement} from the package registry: {tail[0]}")
    return path


def source(lib: str, member: str) -> str:
    """The text of ``member`` (a path inside the release, e.g. ``mmcv/cnn/bricks/conv_module.py``)."""
    path = archive(lib)
    if path.suffix == ".whl":
        with zipfile.ZipFile(path) as z:
            return z.read(member).decode()
    with tarfile.open(path) as t:
        root = t.getnames()[0].split("/")[0]
        return t.extractfile(f"{root}/{member}").read().decode()


def _package(name: str) -> types.ModuleType:
    """The (stub) package ``name`` in sys.modules, its parents too."""
    if name in sys.modules:
        return sys.modules[name]
    module = types.ModuleType(name)
    module.__path__ = []
    module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
    sys.modules[name] = module
    if "." in name:
        parent, _, child = name.rpartition(".")
        setattr(_package(parent), child, module)
    return module


def stub(name: str, **attrs) -> types.ModuleType:
    """A stub module ``name`` holding ``attrs``."""
    module = _package(name)
    for k, v in attrs.items():
        setattr(module, k, v)
    return module


def load(lib: str, member: str, name: str) -> types.ModuleType:
    """Executes ``member`` of ``lib``'s release as module ``name`` (registered in sys.modules)."""
    parent, _, child = name.rpartition(".")
    module = types.ModuleType(name)
    module.__file__ = f"{archive(lib)}/{member}"
    module.__package__ = parent
    module.__spec__ = importlib.machinery.ModuleSpec(name, None, origin=module.__file__)
    sys.modules[name] = module
    if parent:
        setattr(_package(parent), child, module)
    try:
        exec(compile(source(lib, member), module.__file__, "exec"), module.__dict__)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


class Registry:
    """mmengine's Registry, as far as the loaded files use it (register, get, build)."""

    def __init__(self):
        self.scope, self._modules = "stub", {}

    def register_module(self, name=None, force=False, module=None):
        def register(cls):
            names = name if isinstance(name, (list, tuple)) else [name or cls.__name__]
            for n in names:
                self._modules[n] = cls
            return cls

        return register(module) if module is not None else register

    def get(self, name):
        return self._modules.get(name)

    @contextlib.contextmanager
    def switch_scope_and_registry(self, scope):
        yield self

    def build(self, cfg):
        cfg = dict(cfg)
        kind = cfg.pop("type")
        return (kind if isinstance(kind, type) else self._modules[kind])(**cfg)


class _StubMeta(type):
    """Stand-ins for the transformers names the modeling files import but the tested classes never use:
    usable as a base class, a decorator (with or without arguments), a type annotation (``X[...]``)."""

    def __call__(cls, *args, **kwargs):
        if len(args) == 1 and not kwargs and callable(args[0]):
            return args[0]  # @decorator
        if not args:
            return lambda f: f  # @decorator(...)
        return super().__call__()

    def __getitem__(cls, item):
        return cls

    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _StubMeta(name, (Anything,), {})

    def __or__(cls, other):
        return cls

    __ror__ = __or__


class Anything(nn.Module, metaclass=_StubMeta):
    def __init__(self, *args, **kwargs):
        super().__init__()

    def __call__(self, *args, **kwargs):  # an instance used as a decorator
        return args[0] if len(args) == 1 and callable(args[0]) else (lambda f: f)


def permissive(name: str, **attrs) -> types.ModuleType:
    """A stub module in which every other name is an :class:`Anything`."""
    module = stub(name, **attrs)
    module.__getattr__ = lambda attr: _StubMeta(attr, (Anything,), {}) if not attr.startswith("__") else \
        (_ for _ in ()).throw(AttributeError(attr))
    return module


# ---------------------------------------------------------------------------------------------------
# The libraries
# ---------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def smp() -> Dict[str, type]:
    base = "segmentation_models_pytorch"
    load("smp", f"{base}/base/modules.py", f"{base}.base.modules")
    psp = load("smp", f"{base}/decoders/pspnet/decoder.py", f"{base}.decoders.pspnet.decoder")
    dl = load("smp", f"{base}/decoders/deeplabv3/decoder.py", f"{base}.decoders.deeplabv3.decoder")
    return dict(PSPModule=psp.PSPModule, PSPDecoder=psp.PSPDecoder, ASPPPooling=dl.ASPPPooling, ASPP=dl.ASPP)


@functools.lru_cache(maxsize=None)
def mmengine() -> types.ModuleType:
    """mmengine's registry and utilities stubbed; its own ``weight_init.py`` and ``model/utils.py``
    (``_BatchNormXd``, ``revert_sync_batchnorm``) loaded."""
    registry = stub("mmengine.registry", MODELS=Registry(), WEIGHT_INITIALIZERS=Registry(),
                    build_from_cfg=lambda cfg, registry, default_args=None: registry.build(cfg))
    stub("mmengine.logging", print_log=lambda *a, **k: None)
    stub("mmengine.utils", digit_version=lambda v: Version(v.split("+")[0]).release, is_tuple_of=lambda seq, t:
         isinstance(seq, tuple) and all(isinstance(s, t) for s in seq))
    stub("mmengine.utils.dl_utils", TORCH_VERSION=torch.__version__, mmcv_full_available=lambda: False)
    stub("mmengine.utils.dl_utils.parrots_wrapper", SyncBatchNorm=nn.SyncBatchNorm,
         _BatchNorm=nn.modules.batchnorm._BatchNorm, _InstanceNorm=nn.modules.instancenorm._InstanceNorm)
    init = load("mmengine", "mmengine/model/weight_init.py", "mmengine.model.weight_init")
    utils = load("mmengine", "mmengine/model/utils.py", "mmengine.model.utils")

    class BaseModule(nn.Module):  # mmengine.model.BaseModule without its weight-initialisation machinery
        def __init__(self, init_cfg=None):
            super().__init__()
            self.init_cfg = init_cfg

    stub("mmengine.model", BaseModule=BaseModule, constant_init=init.constant_init, kaiming_init=init.kaiming_init,
         revert_sync_batchnorm=utils.revert_sync_batchnorm)
    return registry


@functools.lru_cache(maxsize=None)
def mmcv() -> type:
    """mmcv's ``ConvModule`` from its source distribution (its compiled ops are never imported)."""
    mmengine()
    bricks = "mmcv/cnn/bricks"
    for part in ("activation", "conv", "norm", "padding"):
        load("mmcv", f"{bricks}/{part}.py", f"mmcv.cnn.bricks.{part}")
    conv_module = load("mmcv", f"{bricks}/conv_module.py", "mmcv.cnn.bricks.conv_module")
    stub("mmcv.cnn", ConvModule=conv_module.ConvModule)
    return conv_module.ConvModule


@functools.lru_cache(maxsize=None)
def mmseg() -> Dict[str, type]:
    mmcv()
    registry = Registry()
    stub("mmseg.registry", MODELS=registry)
    stub("mmseg.structures", build_pixel_sampler=None)
    stub("mmseg.utils", ConfigType=dict, SampleList=list)
    stub("mmseg.models.builder", build_loss=lambda cfg: nn.Identity())  # the loss is not under test
    stub("mmseg.models.losses", accuracy=None)
    load("mmseg", "mmseg/models/utils/wrappers.py", "mmseg.models.utils.wrappers")
    stub("mmseg.models.utils", resize=sys.modules["mmseg.models.utils.wrappers"].resize)
    heads = "mmseg/models/decode_heads"
    load("mmseg", f"{heads}/decode_head.py", "mmseg.models.decode_heads.decode_head")
    psp = load("mmseg", f"{heads}/psp_head.py", "mmseg.models.decode_heads.psp_head")
    uper = load("mmseg", f"{heads}/uper_head.py", "mmseg.models.decode_heads.uper_head")
    return dict(PPM=psp.PPM, PSPHead=psp.PSPHead, UPerHead=uper.UPerHead,
                _BatchNormXd=sys.modules["mmengine.model.utils"]._BatchNormXd,
                revert_sync_batchnorm=sys.modules["mmengine.model.utils"].revert_sync_batchnorm)


@functools.lru_cache(maxsize=None)
def transformers() -> Dict[str, type]:
    root = "transformers"
    for name in ("backbone_utils", "modeling_outputs", "modeling_utils", "utils", "utils.generic",
                 "utils.output_capturing", "utils.import_utils", "initialization", "masking_utils",
                 "modeling_layers", "processing_utils", "pytorch_utils", "integrations.hub_kernels",
                 "utils.logging", "models.upernet.configuration_upernet", "models.beit.configuration_beit",
                 "models.data2vec.configuration_data2vec_vision"):
        permissive(f"{root}.{name}")
    sys.modules[f"{root}.utils"].logging = sys.modules[f"{root}.utils.logging"]
    load("transformers", f"{root}/activations.py", f"{root}.activations")  # ACT2FN, as the models use it
    upernet = load("transformers", f"{root}/models/upernet/modeling_upernet.py",
                   f"{root}.models.upernet.modeling_upernet")
    beit = load("transformers", f"{root}/models/beit/modeling_beit.py", f"{root}.models.beit.modeling_beit")
    d2v = load("transformers", f"{root}/models/data2vec/modeling_data2vec_vision.py",
               f"{root}.models.data2vec.modeling_data2vec_vision")
    return dict(UperNetHead=upernet.UperNetHead, UperNetPyramidPoolingModule=upernet.UperNetPyramidPoolingModule,
                BeitUperHead=beit.BeitUperHead, BeitPyramidPoolingModule=beit.BeitPyramidPoolingModule,
                Data2VecVisionUperHead=d2v.Data2VecVisionUperHead)


@functools.lru_cache(maxsize=None)
def torchvision() -> Dict[str, type]:
    """torchvision's ``deeplabv3.py`` classes (its wheel's C++ ops are built for another torch, so the package
    itself is not imported: the file's relative imports are stubbed)."""
    root = "torchvision"
    for name in ("transforms._presets", "models._api", "models._meta", "models._utils", "models.mobilenetv3",
                 "models.resnet", "models.segmentation._utils", "models.segmentation.fcn"):
        permissive(f"{root}.{name}")
    dl = load("torchvision", f"{root}/models/segmentation/deeplabv3.py", f"{root}.models.segmentation.deeplabv3")
    return dict(ASPPPooling=dl.ASPPPooling, ASPP=dl.ASPP, DeepLabHead=dl.DeepLabHead)


def semseg_lookalike() -> Dict[str, type]:
    """hszhao/semseg's ``model/pspnet.py`` ``PPM`` is on no registry: a look-alike, as its source writes it."""
    module = types.ModuleType("model.pspnet")
    exec(compile('''
import torch
from torch import nn
import torch.nn.functional as F


class PPM(nn.Module):
    def __init__(self, in_dim, reduction_dim, bins, BatchNorm=nn.BatchNorm2d):
        super(PPM, self).__init__()
        self.features = []
        for bin in bins:
            self.features.append(nn.Sequential(
                nn.AdaptiveAvgPool2d(bin),
                nn.Conv2d(in_dim, reduction_dim, kernel_size=1, bias=False),
                BatchNorm(reduction_dim),
                nn.ReLU(inplace=True)
            ))
        self.features = nn.ModuleList(self.features)

    def forward(self, x):
        x_size = x.size()
        out = [x]
        for f in self.features:
            out.append(F.interpolate(f(x), x_size[2:], mode='bilinear', align_corners=True))
        return torch.cat(out, 1)
''', "model/pspnet.py", "exec"), module.__dict__)
    sys.modules["model.pspnet"] = module
    _package("model").pspnet = module
    return dict(PPM=module.PPM)
