"""``msfused.fuse``: a user's hand-written multi-scale block, traced with ``torch.fx`` and fused.

The pattern (SPEC.md's composition, however it is written): branches that each resize the same input
``x`` (adaptive average pooling, average pooling by a factor, an ``F.interpolate`` / ``nn.Upsample`` by a
``scale_factor``, or nothing), convolve (``nn.Conv2d``), optionally norm (a BatchNorm), optionally activate
(ReLU, SiLU, exact GELU: module, function or method) and resize back (``F.interpolate`` / ``nn.Upsample``
by ``size`` or ``scale_factor``, or nothing), joined by ``torch.cat`` along channels with or without ``x``
first or last. Each matched ``torch.cat`` becomes one call of :func:`pyramid`, which checks at run time
what only the input's size can tell (a ``size=`` that is not ``x``'s, a ``scale_factor`` that does not
divide exactly) and runs either the fused operator or the same composition as the original graph.
"""

from __future__ import annotations

import warnings
from typing import Any, List, Optional, Sequence, Tuple

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from .functional import multi_scale, norm_unfusable_reason
from .spec import make_spec


class _NoMatch(Exception):
    pass


def _need(condition: bool, reason: str) -> None:
    if not condition:
        raise _NoMatch(reason)


_ACT_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", F.silu: "silu", F.gelu: "gelu"}
_ACT_METHODS = {"relu": "relu", "relu_": "relu"}
_ACT_MODULES = {nn.ReLU: "relu", nn.SiLU: "silu", nn.GELU: "gelu"}


def _arg(node: torch.fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _pair(v: Any) -> Tuple[Any, Any]:
    return (v, v) if not isinstance(v, (tuple, list)) else tuple(v)


class _Matcher:
    def __init__(self, gm: torch.fx.GraphModule):
        self.gm = gm
        self.modules = dict(gm.named_modules())

    def module(self, node: Any) -> Optional[nn.Module]:
        if isinstance(node, torch.fx.Node) and node.op == "call_module":
            return self.modules[node.target]
        return None

    def single_input(self, node: torch.fx.Node) -> torch.fx.Node:
        src = node.args[0] if node.args else node.kwargs.get("input")
        _need(isinstance(src, torch.fx.Node), f"{node.name} reads no traced tensor")
        return src

    def resize(self, node: torch.fx.Node) -> Optional[Tuple[torch.fx.Node, tuple]]:
        """(input, ('size', size, mode, align_corners) or ('scale', sh, sw, mode, align_corners)) when ``node``
        is an interpolate / Upsample, else None."""
        m = self.module(node)
        if type(m) is nn.Upsample:
            size, sf, mode, ac = m.size, m.scale_factor, m.mode, m.align_corners
            _need(not getattr(m, "recompute_scale_factor", None), f"{node.name} recomputes its scale factor")
        elif node.op == "call_function" and node.target is F.interpolate:
            size, sf = _arg(node, 1, "size"), _arg(node, 2, "scale_factor")
            mode, ac = _arg(node, 3, "mode", "nearest"), _arg(node, 4, "align_corners")
            _need(not _arg(node, 5, "recompute_scale_factor"), f"{node.name} recomputes its scale factor")
            _need(not _arg(node, 6, "antialias", False), f"{node.name} antialiases")
        else:
            return None
        _need(mode in ("bilinear", "nearest"), f"{node.name} resizes with mode {mode!r}; fused: bilinear, nearest")
        ac = bool(ac) if mode == "bilinear" else None
        if size is not None:
            return self.single_input(node), ("size", size, mode, ac)
        sh, sw = _pair(sf)
        return self.single_input(node), ("scale", float(sh), float(sw), mode, ac)

    def only_user(self, node: torch.fx.Node, user: torch.fx.Node) -> None:
        _need(list(node.users) == [user], f"{node.name} is also used outside the pyramid")

    def branch(self, out: torch.fx.Node, chain: List[torch.fx.Node]) -> tuple:
        """Parses one cat element back to its input: (x, down, conv node target, norm target, activation, up)."""
        node = out
        up = ("none",)
        found = self.resize(node)
        if found is not None:
            chain.append(node)
            node, up = found
            self.only_user(node, chain[-1])
        activation = None
        m = self.module(node)
        if type(m) in _ACT_MODULES or (node.op == "call_function" and node.target in _ACT_FUNCTIONS) or \
                (node.op == "call_method" and node.target in _ACT_METHODS):
            if m is not None:
                activation = _ACT_MODULES[type(m)]
                _need(not (type(m) is nn.GELU and m.approximate != "none"), f"{node.name} is a tanh GELU")
            elif node.op == "call_function":
                activation = _ACT_FUNCTIONS[node.target]
                _need(_arg(node, 1, "approximate", "none") in ("none", False, True) or activation != "gelu",
                      f"{node.name} is a tanh GELU")
            else:
                activation = "relu"
            chain.append(node)
            node = self.single_input(node)
            self.only_user(node, chain[-1])
        norm = None
        m = self.module(node)
        if type(m) is nn.Identity:  # a branch without norm written with nn.Identity
            chain.append(node)
            node = self.single_input(node)
            self.only_user(node, chain[-1])
        elif isinstance(m, nn.modules.batchnorm._NormBase) or isinstance(m, nn.GroupNorm):
            why = norm_unfusable_reason(m)
            _need(why is None, f"{node.target} is {why}")
            norm = node.target
            chain.append(node)
            node = self.single_input(node)
            self.only_user(node, chain[-1])
        conv = self.module(node)
        _need(type(conv) is nn.Conv2d, f"{node.name} is not an nn.Conv2d where a branch's convolution should be")
        k = conv.kernel_size[0]
        where = node.target
        _need(conv.kernel_size == (k, k) and k % 2, f"{where} has kernel {conv.kernel_size}")
        _need(conv.stride == (1, 1), f"{where} is strided ({conv.stride})")
        _need(conv.dilation == (1, 1), f"{where} is dilated ({conv.dilation})")
        _need(conv.groups == 1, f"{where} has groups={conv.groups}")
        _need(conv.padding == (k // 2, k // 2), f"{where} has padding {conv.padding}, not {k // 2}")
        _need(conv.padding_mode == "zeros", f"{where} pads with {conv.padding_mode!r}")
        _need(norm is None or self.modules[norm].num_features == conv.out_channels, f"{norm} does not match {where}")
        chain.append(node)
        conv_target = node.target
        node = self.single_input(node)
        down = ("none",)
        m = self.module(node)
        is_adaptive = type(m) is nn.AdaptiveAvgPool2d or (node.op == "call_function" and
                                                         node.target is F.adaptive_avg_pool2d)
        is_avg = type(m) is nn.AvgPool2d or (node.op == "call_function" and node.target is F.avg_pool2d)
        resized = self.resize(node)
        if is_adaptive or is_avg or resized is not None:
            self.only_user(node, chain[-1])
            chain.append(node)
            if is_adaptive:
                size = m.output_size if m is not None else _arg(node, 1, "output_size")
                h, w = _pair(size)
                _need(isinstance(h, int) and isinstance(w, int), f"{node.name} pools to {size}; bins must be ints")
                down = ("bins", h, w)
            elif is_avg:
                if m is not None:
                    kernel, stride, pad, ceil, div = m.kernel_size, m.stride, m.padding, m.ceil_mode, m.divisor_override
                else:
                    kernel, stride = _arg(node, 1, "kernel_size"), _arg(node, 2, "stride")
                    pad, ceil, div = _arg(node, 3, "padding", 0), _arg(node, 4, "ceil_mode", False), \
                        _arg(node, 6, "divisor_override")
                kh, kw = _pair(kernel)
                stride = kernel if stride in (None, [], ()) else stride
                _need(kh == kw and isinstance(kh, int) and _pair(stride) == (kh, kw) and _pair(pad) == (0, 0) and
                      not ceil and div is None, f"{node.name} is not an average pooling by one factor (stride = kernel)")
                down = ("avg", kh)
            else:
                node, how = resized
                _need(how[0] == "scale", f"{chain[-1].name} resizes down by size; give a scale_factor")
                _need(how[1] == how[2] and how[1] > 0 and float(round(1 / how[1])) == 1 / how[1],
                      f"{chain[-1].name}'s scale_factor {how[1]} is not 1 / an integer")
                down = ("scale", int(round(1 / how[1])), how[3], how[4])
            node = self.single_input(chain[-1]) if resized is None else node
        return node, down, conv_target, norm, activation, up

    def match(self, cat: torch.fx.Node) -> Tuple[torch.fx.Node, list, Optional[str], Optional[str], List]:
        tensors = _arg(cat, 0, "tensors")
        dim = _arg(cat, 1, "dim", 0)
        _need(dim == 1, f"{cat.name} concatenates along dim {dim}")
        _need(isinstance(tensors, (list, tuple)) and all(isinstance(t, torch.fx.Node) for t in tensors),
              f"{cat.name} has no list of traced tensors")
        parsed, chains, errors = [], [], []
        for t in tensors:
            chain: List[torch.fx.Node] = []
            try:
                parsed.append(self.branch(t, chain))
                chains.append(chain)
            except _NoMatch as e:
                parsed.append(None)
                if t.op != "placeholder":  # (x itself is no branch)
                    errors.append(str(e))
        inputs = {p[0] for p in parsed if p is not None}
        _need(len(inputs) == 1, errors[0] if errors else f"{cat.name}'s branches read different inputs")
        x = inputs.pop()
        position = None
        rest = list(range(len(tensors)))
        if tensors[0] is x:
            position, rest = "first", rest[1:]
        elif tensors[-1] is x:
            position, rest = "last", rest[:-1]
        for i in rest:
            _need(parsed[i] is not None and tensors[i] is not x, errors[0] if errors else f"{cat.name}: x in the middle")
        _need(len(rest) > 0, f"{cat.name} has no branch")
        branches = [parsed[i] for i in rest]
        acts = {b[4] for b in branches}
        _need(len(acts) == 1, f"{cat.name}'s branches use different activations {sorted(map(str, acts))}")
        kinds = {"bins" if b[1][0] == "bins" else "factor" for b in branches}
        _need(len(kinds) == 1, f"{cat.name} mixes adaptive pooling with factor levels")
        ups = {(u[-2], u[-1]) for u in (b[5] for b in branches) if u[0] != "none"}
        downs = {(d[2], d[3]) if d[0] == "scale" else ("avg", None) for d in (b[1] for b in branches)
                 if d[0] in ("scale", "avg")}
        _need(len(ups) <= 1, f"{cat.name}'s branches resize back differently {sorted(map(str, ups))}")
        _need(len(downs) <= 1, f"{cat.name}'s branches resize down differently")
        acs = {ac for _, ac in ups | downs if ac is not None}
        _need(len(acs) <= 1, f"{cat.name} mixes align_corners")
        return x, branches, position, acts.pop(), [n for c in (chains[i] for i in range(len(chains))) for n in c]


def pyramid(x: torch.Tensor, branches: Sequence[tuple], activation: Optional[str],
            input_position: Optional[str]) -> torch.Tensor:
    """What :func:`fuse` puts in place of a matched ``torch.cat``: ``branches`` are ``(down, conv, norm,
    up)`` (modules, and tuples describing the resizes as the original graph wrote them). Runs the fused
    operator when the resizes are SPEC.md's for this input, else the same composition as the original."""
    spec = _spec(x, branches, activation, input_position)
    if spec is not None:
        shared = nn.ModuleList(_Branch(conv, norm) for _, conv, norm, _ in branches)
        return multi_scale(x, spec, shared)
    outs = []
    for down, conv, norm, up in branches:
        z = _down(x, down)
        a = conv(z)
        if norm is not None:
            a = norm(a)
        if activation is not None:
            a = {"relu": F.relu, "silu": F.silu, "gelu": F.gelu}[activation](a)
        if up[0] == "size":
            a = F.interpolate(a, size=up[1], mode=up[2], align_corners=up[3])
        elif up[0] == "scale":
            a = F.interpolate(a, scale_factor=(up[1], up[2]), mode=up[3], align_corners=up[4])
        outs.append(a)
    if input_position == "first":
        outs.insert(0, x)
    elif input_position == "last":
        outs.append(x)
    return torch.cat(outs, 1)


class _Branch(nn.Module):
    def __init__(self, conv: nn.Module, norm: Optional[nn.Module]):
        super().__init__()
        self.conv, self.norm = conv, norm if norm is not None else nn.Identity()


def _down(x: torch.Tensor, down: tuple) -> torch.Tensor:
    if down[0] == "bins":
        return F.adaptive_avg_pool2d(x, (down[1], down[2]))
    if down[0] == "avg":
        return F.avg_pool2d(x, down[1])
    if down[0] == "scale":
        return F.interpolate(x, scale_factor=1.0 / down[1], mode=down[2], align_corners=down[3])
    return x


def _spec(x: torch.Tensor, branches: Sequence[tuple], activation: Optional[str], input_position: Optional[str]):
    """The BlockSpec computing ``branches`` on ``x`` exactly as written, or None (then the composition runs)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        return None
    H, W = x.shape[-2:]
    levels, down_mode, up_mode, align = [], "avg", "bilinear", False
    for down, conv, norm, up in branches:
        if down[0] == "bins":
            level, lv = ("bins", (down[1], down[2])), (down[1], down[2])
        elif down[0] == "avg":
            level, lv = ("factor", down[1]), (H // down[1], W // down[1])
        elif down[0] == "scale":  # F.interpolate by 1/s: SPEC's size= resize when s divides the map
            if H % down[1] or W % down[1]:
                return None
            level, lv = ("factor", down[1]), (H // down[1], W // down[1])
            down_mode = down[2]
            align = bool(down[3]) if down[2] == "bilinear" else align
        else:
            level, lv = ("factor", 1), (H, W)
        if up[0] == "size":
            size = up[1]
            size = tuple(size) if isinstance(size, (tuple, list, torch.Size)) else (size, size)
            if tuple(int(s) for s in size) != (H, W):
                return None
        elif up[0] == "scale":  # equal to size=(H, W) only when level * factor is exactly the map
            if lv[0] * up[1] != H or lv[1] * up[2] != W:
                return None
        elif lv != (H, W):
            return None
        if up[0] != "none":
            up_mode = up[-2]
            align = bool(up[-1]) if up_mode == "bilinear" else align
        levels.append(level)
    kind = levels[0][0]
    try:
        return make_spec(
            branches[0][1].in_channels, [b[1].out_channels for b in branches],
            **({"bins": [lv for _, lv in levels]} if kind == "bins" else {"scales": [f for _, f in levels]}),
            kernel_size=[b[1].kernel_size[0] for b in branches], down_mode=down_mode, up_mode=up_mode,
            align_corners=align, bias=[b[1].bias is not None for b in branches],
            norm=["batch" if b[2] is not None else None for b in branches], activation=activation,
            input_position=input_position)
    except (TypeError, ValueError):
        return None


def fuse(module: nn.Module, concrete_args: Optional[dict] = None):
    """``module`` (a user's own block) traced with ``torch.fx`` and every multi-scale pattern in it computed by
    the fused operator: a ``torch.fx.GraphModule`` holding the original's used submodules (the same objects:
    parameters shared, ``state_dict`` keys theirs). A module that cannot be traced or holds no such pattern
    is returned unchanged, with a warning that says why."""
    try:
        gm = torch.fx.symbolic_trace(module, concrete_args=concrete_args)
    except Exception as e:  # noqa: BLE001  (whatever the trace raises is the reason)
        warnings.warn(f"msfused.fuse: {type(module).__name__} cannot be traced by torch.fx ({type(e).__name__}: "
                      f"{str(e).splitlines()[0] if str(e) else ''}); returned unchanged", UserWarning, stacklevel=2)
        return module
    matcher = _Matcher(gm)
    graph = gm.graph
    fused, reasons = 0, []
    for cat in [n for n in graph.nodes if n.op == "call_function" and n.target is torch.cat]:
        try:
            x, branches, position, activation, chain = matcher.match(cat)
        except _NoMatch as e:
            reasons.append(str(e))
            continue
        with graph.inserting_before(cat):
            args = []
            for _, down, conv, norm, _, up in branches:
                conv_node = graph.get_attr(conv)
                norm_node = graph.get_attr(norm) if norm is not None else None
                args.append((down, conv_node, norm_node, up))
            new = graph.call_function(pyramid, (x, args, activation, position))
        cat.replace_all_uses_with(new)
        graph.erase_node(cat)
        for node in chain:  # the branches' nodes, outputs first (each used only by the next one up)
            if not node.users:
                graph.erase_node(node)
        fused += 1
    if not fused:
        why = "; ".join(reasons) or "no torch.cat of branches"
        warnings.warn(f"msfused.fuse: no multi-scale block found in {type(module).__name__} ({why}); returned "
                      "unchanged", UserWarning, stacklevel=2)
        return module
    graph.eliminate_dead_code()
    graph.lint()
    return torch.fx.GraphModule(module, graph, class_name=f"Fused{type(module).__name__}")

