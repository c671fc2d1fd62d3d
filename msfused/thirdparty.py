"""Third-party pyramid blocks fused in place: the table of known modules and the mechanism.

A module whose class (or a base class, by qualified name: no third-party import) is in ``TABLE`` and whose
method is still the library's own gets that method shadowed by an instance attribute, a :class:`_Fused`
that computes the same numbers through :func:`msfused.multi_scale` on the module's own conv and norm
submodules. Nothing else changes: the class, submodules, parameters, buffers, ``state_dict`` keys and hooks
stay the user's, and the attribute pickles, deep-copies and traces (``torch.compile``) with the module.
:func:`unfuse` deletes it. Each entry's extractor reads the configuration from the module and raises
:class:`Refused` with the reason for anything SPEC.md does not compute.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .functional import multi_scale, norm_unfusable_reason
from .spec import BlockSpec, make_project, make_spec


class Refused(Exception):
    """A known module that does not fit SPEC.md; the message says why."""


def _need(condition: bool, reason: str) -> None:
    if not condition:
        raise Refused(reason)


def qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _library_class(module: nn.Module, name: str) -> Optional[type]:
    """The class in ``module``'s MRO whose qualified name is ``name``, or None."""
    for cls in type(module).__mro__:
        if qualified_name(cls) == name:
            return cls
    return None


def _is(module: Any, name: str, method: str = "forward") -> bool:
    """Whether ``module`` is an instance of the class qualified ``name`` whose ``method`` it does not override."""
    cls = _library_class(module, name) if isinstance(module, nn.Module) else None
    own = vars(module).get(method) if cls is not None else None
    return cls is not None and getattr(type(module), method) is getattr(cls, method) and \
        (own is None or isinstance(own, _Fused))  # converted (by msfused) is still the library's method


def _expect(module: Any, name: str, where: str) -> None:
    short = name.rsplit(".", 1)[-1]
    _need(_library_class(module, name) is not None if isinstance(module, nn.Module) else False,
          f"{where} is a {type(module).__name__}, not the library's {short}")
    _need(_is(module, name), f"{where} ({type(module).__name__}) overrides {short}.forward")


# ---------------------------------------------------------------------------------------------------
# Reading branches
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Branch:
    """One branch as found: its pool's bins and the paths (from the converted module) of its conv, norm
    (None: no norm) and activation module (None: no activation)."""

    bins: Tuple[int, int]
    conv: str
    norm: Optional[str]
    act: Optional[str]


def _bins(pool: nn.Module, where: str) -> Tuple[int, int]:
    _need(type(pool) is nn.AdaptiveAvgPool2d, f"{where} is a {type(pool).__name__}, not nn.AdaptiveAvgPool2d")
    size = pool.output_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    _need(isinstance(h, int) and isinstance(w, int), f"{where} keeps a side of the input ({size}); bins must be set")
    return h, w


def _activation(module: Optional[nn.Module], where: str) -> Optional[str]:
    if module is None or type(module) is nn.Identity:
        return None
    if type(module) is nn.ReLU:
        return "relu"
    if type(module) is nn.SiLU:
        return "silu"
    if type(module) is nn.GELU and module.approximate == "none":
        return "gelu"
    raise Refused(f"{where} is a {type(module).__name__}; the fused kernels apply ReLU, SiLU, exact GELU or none")


def _sequential_cna(seq: nn.Module, where: str) -> Tuple[str, str, str]:
    """An ``nn.Sequential`` (its forward not overridden) of conv, norm (or nn.Identity), activation."""
    _need(type(seq).forward is nn.Sequential.forward and "forward" not in vars(seq),
          f"{where} overrides nn.Sequential.forward")
    names = list(seq._modules)
    _need(len(names) == 3, f"{where} has {len(names)} layers, not (conv, norm, activation)")
    return names[0], names[1], names[2]


_MMCV_CONV_MODULE = "mmcv.cnn.bricks.conv_module.ConvModule"


def _mmcv_cna(m: nn.Module, where: str) -> Tuple[str, Optional[str], Optional[str]]:
    _expect(m, _MMCV_CONV_MODULE, where)
    _need(tuple(m.order) == ("conv", "norm", "act"), f"{where}.order is {m.order}, not ('conv', 'norm', 'act')")
    _need(not m.with_explicit_padding, f"{where} pads explicitly (padding_mode)")
    _need(not getattr(m, "with_spectral_norm", False), f"{where} uses spectral norm")
    return "conv", (m.norm_name if m.with_norm else None), ("activate" if m.with_activation else None)


@dataclasses.dataclass
class Plan:
    """What a converted method computes: the block's spec, its branches (the module's own conv and norm
    modules, shared), every submodule the library's method would call (for hooks and replacement checks)
    and entry-specific details."""

    spec: BlockSpec
    branches: nn.ModuleList
    watched: Tuple[Tuple[Tuple[str, ...], nn.Module], ...]
    extra: Dict[str, Any]


class _SharedBranch(nn.Module):
    """Presents a found branch to :func:`msfused.multi_scale` as ``branch.conv`` / ``branch.norm`` (the
    user's modules themselves; this wrapper is not registered anywhere in the user's model)."""

    def __init__(self, conv: nn.Module, norm: nn.Module):
        super().__init__()
        self.conv, self.norm = conv, norm


def _module_at(root: nn.Module, path: Sequence[str]) -> Optional[nn.Module]:
    m = root
    for name in path:
        m = m._modules.get(name) if m is not None else None
    return m


def _split(path: str) -> Tuple[str, ...]:
    return tuple(path.split(".")) if path else ()


def _conv_norm_act(module: nn.Module, conv_path: str, norm_path: Optional[str],
                   act_path: Optional[str]) -> Tuple[nn.Conv2d, Optional[nn.Module], Optional[str]]:
    """The conv (SPEC.md's: odd square kernel, stride 1, padding k // 2 with zeros, no dilation, no groups), the
    norm (None: none) and the activation name at these paths in ``module``; :class:`Refused` otherwise."""
    conv = _module_at(module, _split(conv_path))
    where = conv_path or "conv"
    _need(type(conv) is nn.Conv2d, f"{where} is a {type(conv).__name__}, not nn.Conv2d")
    k = conv.kernel_size[0]
    _need(conv.kernel_size == (k, k) and k % 2 == 1, f"{where} has kernel {conv.kernel_size}, not odd and square")
    _need(conv.stride == (1, 1), f"{where} has stride {conv.stride}")
    _need(conv.dilation == (1, 1), f"{where} is dilated ({conv.dilation})")
    _need(conv.groups == 1, f"{where} has groups={conv.groups}")
    _need(conv.padding == (k // 2, k // 2), f"{where} has padding {conv.padding}, not {k // 2}")
    _need(conv.padding_mode == "zeros", f"{where} pads with {conv.padding_mode!r}, not zeros")
    norm = _module_at(module, _split(norm_path)) if norm_path is not None else None
    if norm is not None and type(norm) is not nn.Identity:
        why = norm_unfusable_reason(norm)
        _need(why is None, f"{norm_path} is {why}")
        _need(norm.num_features == conv.out_channels,
              f"{norm_path} has {norm.num_features} features for {conv.out_channels} channels")
    act = _activation(_module_at(module, _split(act_path)) if act_path is not None else None, act_path or "")
    return conv, norm, act


def _plan(module: nn.Module, prefix: str, found: List[_Branch], align_corners: bool,
          input_position: Optional[str], **extra: Any) -> Plan:
    """Checks the found branches against SPEC.md and builds the plan; ``prefix`` is the path of the
    submodule that holds them (all of it is watched)."""
    _need(len(found) > 0, "it has no branches")
    branches, convs, norms, acts, channels = [], [], [], [], []
    for b in found:
        conv, norm, act = _conv_norm_act(module, b.conv, b.norm, b.act)
        convs.append(conv)
        norms.append(norm)
        acts.append(act)
        channels.append(conv.out_channels)
        branches.append(_SharedBranch(conv, norm if norm is not None else nn.Identity()))
    _need(len({c.in_channels for c in convs}) == 1, "its convolutions read different channel counts")
    _need(len(set(acts)) == 1, f"its branches use different activations {acts}")
    spec = make_spec(
        convs[0].in_channels, channels, bins=[b.bins for b in found], kernel_size=[c.kernel_size[0] for c in convs],
        down_mode="avg", up_mode="bilinear", align_corners=bool(align_corners),
        bias=[c.bias is not None for c in convs],
        norm=["batch" if n is not None and type(n) is not nn.Identity else None for n in norms],
        activation=acts[0], input_position=input_position,
    )
    return Plan(spec, nn.ModuleList(branches), _watch(module, prefix), dict(extra))


def _watch(module: nn.Module, prefix: str) -> Tuple[Tuple[Tuple[str, ...], nn.Module], ...]:
    """(path, module) of the submodule at ``prefix`` and everything in it (``module`` itself excepted)."""
    holder = _module_at(module, _split(prefix))
    return tuple((_split(prefix) + _split(name), m) for name, m in holder.named_modules() if m is not module)


def _with_projection(module: nn.Module, plan: Plan, path: str, cna: Callable) -> None:
    """Makes the conv module at ``path`` (conv, norm, activation, as ``cna`` names them), which the library's
    method applies to the block's concatenation, the plan's projection (SPEC.md, "The projection": the
    concatenation is then never built): ``plan.extra['project']`` presents its conv and norm, it is
    watched. :class:`Refused` (the plan unchanged) when it is not a projection the kernels compute."""
    conv_name, norm_name, act_name = cna(_module_at(module, _split(path)), path)
    base = path + "."
    conv, norm, act = _conv_norm_act(module, base + conv_name, norm_name and base + norm_name,
                                     act_name and base + act_name)
    _need(conv.in_channels == plan.spec.concat_channels,
          f"{base + conv_name} reads {conv.in_channels} channels, the concatenation has {plan.spec.concat_channels}")
    has_norm = norm is not None and type(norm) is not nn.Identity
    project = make_project(dict(out_channels=conv.out_channels, kernel_size=conv.kernel_size[0],
                                bias=conv.bias is not None, norm="batch" if has_norm else None, activation=act))
    plan.spec = dataclasses.replace(plan.spec, project=project)
    plan.extra["project"] = _SharedBranch(conv, norm if has_norm else nn.Identity())
    plan.watched = plan.watched + _watch(module, path)


# ---------------------------------------------------------------------------------------------------
# Extractors, one per library module
# ---------------------------------------------------------------------------------------------------

_SMP = "segmentation_models_pytorch"


def _smp_psp(module: nn.Module, prefix: str = "") -> List[_Branch]:
    """The branches of smp's ``PSPModule`` ``module``, their paths under ``prefix``."""
    found = []
    for i, block in enumerate(module.blocks):
        where = f"{prefix}blocks.{i}"
        _expect(block, f"{_SMP}.decoders.pspnet.decoder.PSPBlock", where)
        pool = block.pool
        _need(type(pool) is nn.Sequential and len(pool) == 2, f"{where}.pool is not (AdaptiveAvgPool2d, Conv2dReLU)")
        _expect(pool[1], f"{_SMP}.base.modules.Conv2dReLU", f"{where}.pool.1")
        conv, norm, act = _sequential_cna(pool[1], f"{where}.pool.1")
        base = f"{where}.pool.1."
        found.append(_Branch(_bins(pool[0], f"{where}.pool.0"), base + conv, norm and base + norm, act and base + act))
    return found


def extract_smp_psp(module: nn.Module) -> Plan:
    return _plan(module, "", _smp_psp(module), align_corners=True, input_position="last")


def extract_smp_decoder(module: nn.Module) -> Plan:
    """smp's ``PSPDecoder``: its ``psp`` (a ``PSPModule``) with its ``conv`` (a ``Conv2dReLU``) as the
    projection; the ``dropout`` after them stays the module's own."""
    psp = module._modules.get("psp")
    _expect(psp, f"{_SMP}.decoders.pspnet.decoder.PSPModule", "psp")
    plan = _plan(module, "psp", _smp_psp(psp, "psp."), align_corners=True, input_position="last")
    _expect(module._modules.get("conv"), f"{_SMP}.base.modules.Conv2dReLU", "conv")
    _with_projection(module, plan, "conv", _sequential_cna)
    return plan


def extract_aspp_pooling(module: nn.Module) -> Plan:
    """torchvision's and smp's ``ASPPPooling``: an ``nn.Sequential`` (pool, conv, norm, activation) whose
    forward runs each and resizes back with ``align_corners=False``."""
    names = list(module._modules)
    _need(len(names) == 4, f"it has {len(names)} layers, not (AdaptiveAvgPool2d, Conv2d, norm, activation)")
    bins = _bins(module._modules[names[0]], names[0])
    return _plan(module, "", [_Branch(bins, names[1], names[2], names[3])], align_corners=False, input_position=None)


def _ppm_branches(module: nn.Module, prefix: str, blocks: Sequence[Tuple[str, nn.Module]], layers: Callable,
                  cna: Callable) -> List[_Branch]:
    """Branches of an mmseg-style PPM: each block a (pool, conv module) pair; ``layers(block, where)`` gives
    their names in the block, ``cna(conv module, where)`` the conv, norm and activation names in it."""
    found = []
    for name, block in blocks:
        where = f"{prefix}{name}"
        pool_name, cm_name = layers(block, where)
        cm_where = f"{where}.{cm_name}"
        conv, norm, act = cna(block._modules[cm_name], cm_where)
        base = cm_where + "."
        found.append(_Branch(_bins(block._modules[pool_name], f"{where}.{pool_name}"), base + conv,
                             norm and base + norm, act and base + act))
    return found


def _seq_pair(block: nn.Module, where: str) -> Tuple[str, str]:
    _need(type(block) is nn.Sequential and len(block) == 2, f"{where} is not nn.Sequential(AdaptiveAvgPool2d, conv)")
    return "0", "1"


_MMSEG_PPM = "mmseg.models.decode_heads.psp_head.PPM"


def _mmseg_ppm(module: nn.Module, prefix: str) -> List[_Branch]:
    return _ppm_branches(module, prefix, list(module._modules.items()), _seq_pair, _mmcv_cna)


_HF = "transformers.models"
_UPERNET_PPM = f"{_HF}.upernet.modeling_upernet.UperNetPyramidPoolingModule"


def _upernet_ppm(ppm: nn.Module, prefix: str) -> List[_Branch]:
    blocks = list(ppm.blocks)
    _need(len(blocks) == len(ppm._modules) and all(b is ppm._modules[str(i)] for i, b in enumerate(blocks)),
          f"{prefix}blocks is not its registered submodules 0..{len(ppm._modules) - 1}")

    def layers(block, where):
        _expect(block, f"{_HF}.upernet.modeling_upernet.UperNetPyramidPoolingBlock", where)
        _need(len(block.layers) == 2 and block.layers[0] is block._modules["0"] and block.layers[1] is block._modules["1"],
              f"{where}.layers is not its registered (pool, conv module)")
        return "0", "1"

    return _ppm_branches(ppm, prefix, [(str(i), b) for i, b in enumerate(blocks)], layers, _upernet_cna)


def _upernet_cna(m: nn.Module, where: str) -> Tuple[str, str, str]:
    _expect(m, f"{_HF}.upernet.modeling_upernet.UperNetConvModule", where)
    return "conv", "batch_norm", "activation"


def _beit_like_cna(model: str, cls: str) -> Callable:
    def cna(m: nn.Module, where: str) -> Tuple[str, str, str]:
        _expect(m, f"{_HF}.{model}.{cls}ConvLayer", where)
        return "convolution", "normalization", "activation"

    return cna


def _beit_like_ppm(model: str, cls: str):
    def branches(ppm: nn.Module, prefix: str) -> List[_Branch]:
        def layers(block, where):
            _expect(block, f"{_HF}.{model}.{cls}PyramidPoolingBlock", where)
            return "pooling", "conv"

        return _ppm_branches(ppm, prefix + "blocks.", list(ppm.blocks._modules.items()), layers,
                             _beit_like_cna(model, cls))

    return branches


_PPMS = {
    _MMSEG_PPM: (_mmseg_ppm, lambda ppm: ppm.align_corners),
    _UPERNET_PPM: (_upernet_ppm, lambda ppm: ppm.align_corners),
    f"{_HF}.beit.modeling_beit.BeitPyramidPoolingModule":
        (_beit_like_ppm("beit.modeling_beit", "Beit"), lambda ppm: False),
    f"{_HF}.data2vec.modeling_data2vec_vision.Data2VecVisionPyramidPoolingModule":
        (_beit_like_ppm("data2vec.modeling_data2vec_vision", "Data2VecVision"), lambda ppm: False),
}


def _ppm_plan(module: nn.Module, prefix: str, input_position: Optional[str]) -> Plan:
    """The plan of the PPM at ``prefix`` in ``module`` (one of ``_PPMS``, with its own forward)."""
    ppm = _module_at(module, _split(prefix))
    where = prefix or "it"
    name = next((n for n in _PPMS if _library_class(ppm, n) is not None), None) if isinstance(ppm, nn.Module) else None
    _need(name is not None, f"{where} is a {type(ppm).__name__}, not a pyramid pooling module msfused knows")
    _need(_is(ppm, name), f"{where} ({type(ppm).__name__}) overrides forward")
    read, align_corners = _PPMS[name]
    found = read(ppm, prefix + "." if prefix else "")
    return _plan(module, prefix, found, align_corners(ppm), input_position)


def extract_ppm(module: nn.Module) -> Plan:
    return _ppm_plan(module, "", None)


def _head(bottleneck: str, cna: Callable) -> Callable[[nn.Module], Plan]:
    """A head's PSP path: its ``psp_modules`` and the ``bottleneck`` conv module (``cna`` names its conv, norm
    and activation) as the block's projection; a bottleneck the kernels do not compute as a projection
    runs as the module it is, on the fused block's output (its reason in ``plan.extra['project_refused']``)."""
    def extract(head: nn.Module) -> Plan:
        plan = _ppm_plan(head, "psp_modules", "first")
        _need(isinstance(getattr(head, bottleneck, None), nn.Module), f"it has no {bottleneck} module")
        plan.extra["bottleneck"] = bottleneck
        try:
            _with_projection(head, plan, bottleneck, cna)
        except Refused as e:
            plan.extra["project_refused"] = str(e)
        return plan

    return extract


def extract_semseg_ppm(module: nn.Module) -> Plan:
    """hszhao/semseg's ``model/pspnet.py`` ``PPM``: ``features``, each nn.Sequential(pool, conv, norm,
    activation), ``torch.cat([x] + ...)`` with ``align_corners=True``."""
    found = []
    for name, seq in module.features._modules.items():
        where = f"features.{name}"
        _need(type(seq) is nn.Sequential and len(seq) == 4, f"{where} is not nn.Sequential(pool, conv, norm, act)")
        found.append(_Branch(_bins(seq[0], f"{where}.0"), f"{where}.1", f"{where}.2", f"{where}.3"))
    return _plan(module, "", found, align_corners=True, input_position="first")


# ---------------------------------------------------------------------------------------------------
# Running a converted method
# ---------------------------------------------------------------------------------------------------


def _run_block(module: nn.Module, plan: Plan, x: torch.Tensor) -> torch.Tensor:
    return multi_scale(x, plan.spec, plan.branches)


def _run_list(module: nn.Module, plan: Plan, x: torch.Tensor) -> List[torch.Tensor]:
    """PPMs that return the upsampled branches as a list: one fused call, split by channels."""
    y = multi_scale(x, plan.spec, plan.branches)
    return list(y.split([b.out_channels for b in plan.spec.branches], dim=1))


def _block_and_bottleneck(head: nn.Module, plan: Plan, x: torch.Tensor) -> torch.Tensor:
    project = plan.extra.get("project")
    if project is not None:
        return multi_scale(x, plan.spec, plan.branches, project)
    return getattr(head, plan.extra["bottleneck"])(multi_scale(x, plan.spec, plan.branches))


def _run_mmseg_psp_head(head: nn.Module, plan: Plan, inputs: Any) -> torch.Tensor:
    return _block_and_bottleneck(head, plan, head._transform_inputs(inputs))


def _run_psp_forward(head: nn.Module, plan: Plan, inputs: Any) -> torch.Tensor:
    return _block_and_bottleneck(head, plan, inputs[-1])


def _run_smp_decoder(decoder: nn.Module, plan: Plan, features: Any) -> torch.Tensor:
    return decoder.dropout(multi_scale(features[-1], plan.spec, plan.branches, plan.extra["project"]))


@dataclasses.dataclass(frozen=True)
class Entry:
    """A known library method: the class's qualified name, the method converted, what to call it in
    reports, the extractor (module -> :class:`Plan`, or :class:`Refused`) and the fused method."""

    qualname: str
    method: str
    label: str
    extract: Callable[[nn.Module], Plan]
    run: Callable[..., Any]


def _entries() -> Dict[str, Entry]:
    rows = [
        (f"{_SMP}.decoders.pspnet.decoder.PSPModule", "forward", "smp PSPModule", extract_smp_psp, _run_block),
        (f"{_SMP}.decoders.pspnet.decoder.PSPDecoder", "forward", "smp PSPDecoder", extract_smp_decoder,
         _run_smp_decoder),
        (f"{_SMP}.decoders.deeplabv3.decoder.ASPPPooling", "forward", "smp ASPPPooling", extract_aspp_pooling,
         _run_block),
        ("torchvision.models.segmentation.deeplabv3.ASPPPooling", "forward", "torchvision ASPPPooling",
         extract_aspp_pooling, _run_block),
        (_MMSEG_PPM, "forward", "mmseg PPM", extract_ppm, _run_list),
        ("mmseg.models.decode_heads.psp_head.PSPHead", "_forward_feature", "mmseg PSPHead._forward_feature",
         _head("bottleneck", _mmcv_cna), _run_mmseg_psp_head),
        ("mmseg.models.decode_heads.uper_head.UPerHead", "psp_forward", "mmseg UPerHead.psp_forward",
         _head("bottleneck", _mmcv_cna), _run_psp_forward),
        (_UPERNET_PPM, "forward", "transformers UperNetPyramidPoolingModule", extract_ppm, _run_list),
        (f"{_HF}.upernet.modeling_upernet.UperNetHead", "psp_forward", "transformers UperNetHead.psp_forward",
         _head("bottleneck", _upernet_cna), _run_psp_forward),
        (f"{_HF}.beit.modeling_beit.BeitPyramidPoolingModule", "forward", "transformers BeitPyramidPoolingModule",
         extract_ppm, _run_list),
        (f"{_HF}.beit.modeling_beit.BeitUperHead", "psp_forward", "transformers BeitUperHead.psp_forward",
         _head("psp_bottleneck", _beit_like_cna("beit.modeling_beit", "Beit")), _run_psp_forward),
        (f"{_HF}.data2vec.modeling_data2vec_vision.Data2VecVisionPyramidPoolingModule", "forward",
         "transformers Data2VecVisionPyramidPoolingModule", extract_ppm, _run_list),
        (f"{_HF}.data2vec.modeling_data2vec_vision.Data2VecVisionUperHead", "psp_forward",
         "transformers Data2VecVisionUperHead.psp_forward",
         _head("psp_bottleneck", _beit_like_cna("data2vec.modeling_data2vec_vision", "Data2VecVision")),
         _run_psp_forward),
        ("model.pspnet.PPM", "forward", "semseg PPM", extract_semseg_ppm, _run_block),
    ]
    return {name: Entry(name, method, label, extract, run) for name, method, label, extract, run in rows}


#: Known library modules by qualified class name (module path and class name).
TABLE: Dict[str, Entry] = _entries()


_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks")


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks or
                module._backward_pre_hooks)


_warned: set = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


class _Fused:
    """The instance attribute that shadows a converted library method. Runs the fused block unless
    something the library's method would do is not what the plan computes: a hook on a submodule it calls,
    a global module hook, a submodule replaced since :func:`convert_module` (re-read, or the library's
    method where it no longer fits), ONNX export; then the library's own method runs."""

    def __init__(self, module: nn.Module, qualname: str, plan: Plan):
        self.module, self.qualname, self.plan = module, qualname, plan

    def _library_method(self) -> Callable[..., Any]:
        entry = TABLE[self.qualname]
        return getattr(_library_class(self.module, self.qualname), entry.method).__get__(self.module)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        module, plan = self.module, self.plan
        if plan is not None and any(_module_at(module, path) is not m for path, m in plan.watched):
            try:
                plan = self.plan = TABLE[self.qualname].extract(module)
            except Refused as e:
                plan = self.plan = None
                _warn_once(f"msfused: {type(module).__name__} changed after msfused.convert and no longer fits "
                           f"the fused kernels ({e}); it runs its own {TABLE[self.qualname].method}")
        if plan is None or torch.onnx.is_in_onnx_export() or \
                any(getattr(nn.modules.module, h) for h in _GLOBAL_HOOKS) or \
                any(_hooked(m) for _, m in plan.watched):
            return self._library_method()(*args, **kwargs)
        return TABLE[self.qualname].run(module, plan, *args, **kwargs)


def _entry_of(module: nn.Module) -> Optional[Entry]:
    return next((TABLE[qualified_name(c)] for c in type(module).__mro__ if qualified_name(c) in TABLE), None)


def plan_of(module: nn.Module) -> Optional[Plan]:
    """The plan :func:`convert_module` gives ``module`` (converted or not; its branches hold ``module``'s own
    conv and norm modules), or None: not a known class, or refused."""
    entry = _entry_of(module)
    if entry is None or not _is(module, entry.qualname, entry.method):
        return None
    try:
        return entry.extract(module)
    except Refused:
        return None


def convert_module(module: nn.Module) -> Optional[Tuple[str, Optional[str]]]:
    """Converts ``module`` in place if its class is in ``TABLE``: returns (label, None) when converted,
    (label, reason) when refused, None when not a known class."""
    entry = _entry_of(module)
    if entry is None:
        return None
    if isinstance(vars(module).get(entry.method), _Fused):  # converted before: read it again
        del vars(module)[entry.method]
    if not _is(module, entry.qualname, entry.method):
        return entry.label, f"{type(module).__name__} overrides {entry.method}"
    try:
        plan = entry.extract(module)
    except Refused as e:
        return entry.label, str(e)
    setattr(module, entry.method, _Fused(module, entry.qualname, plan))
    return entry.label, None


def unfuse(module: nn.Module) -> bool:
    """Removes what :func:`convert_module` set on ``module``; whether there was anything."""
    names = [name for name, value in vars(module).items() if isinstance(value, _Fused)]
    for name in names:
        delattr(module, name)
    return bool(names)


def is_converted(module: nn.Module) -> bool:
    return any(isinstance(v, _Fused) for v in vars(module).values())
