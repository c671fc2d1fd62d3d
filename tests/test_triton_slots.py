"""The slotted kernels' descriptions (msfused/triton/slots.py): every kernel generated from one, the launcher's
packing checked against it, and the launch plan's per-slot view its inverse. No kernel runs here (the
kernels themselves: tests/test_triton.py; that the generated kernels compile to the PTX of the
hand-unrolled ones they replaced was checked when they were introduced, issue 12)."""

from __future__ import annotations

import dataclasses
import re

import pytest

pytest.importorskip("triton")

from msfused.triton import kernels as K  # noqa: E402
from msfused.triton.slots import MAX_SLOTS  # noqa: E402

SLOTTED = [K.LEVELS, K.BLOCK, K.CONVS, K.UPS, K.UP_ADJOINTS, K.COLUMN_SUMS, K.DPRES, K.DX]


@pytest.mark.parametrize("desc", SLOTTED, ids=lambda d: d.name)
def test_generated_kernel_takes_what_the_launcher_packs(desc):
    """A launch packed from named slot arguments fills exactly the kernel's parameters, in its order: shared
    arguments, then per slot its arguments (suffixed with the slot) and, where the launcher gives them, the
    ends; its compile-time arguments are the flags of every slot and SLOTS."""
    src = desc.source()
    names = src[src.index("(") + 1:src.index("):")].split(", ")
    runtime = [n.split(":")[0] for n in names if ": tl.constexpr" not in n]
    consts = {n.split(":")[0] for n in names if ": tl.constexpr" in n}
    # a norm's eps reaches float64 kernels unrounded: typed, where Triton would make a Python float float32
    assert all(n.endswith(": tl.float64") for n in names if re.fullmatch(r"eps\d?", n.split(":")[0]))
    values = {n: f"<{n}>" for n in desc.slot_names}
    slots = [({n: f"{v}{s}" for n, v in values.items()}, desc.flags()) for s in range(2)]
    ends = [0, 3, 5] if desc.has_ends else ([0] if desc.has_e0 else None)
    flat, kw = desc.pack(slots, ends)
    assert len(desc.shared_names) + len(flat) == len(runtime)
    positional = dict(zip(runtime[len(desc.shared_names):], flat))
    for s in range(MAX_SLOTS):
        for n in desc.slot_names:  # unused slots repeat the first one's
            assert positional[f"{n}{s}"] == f"<{n}>{s if s < 2 else 0}"
    assert set(kw) <= consts and kw["SLOTS"] == 2
    assert {f"{f}{s}" for f in desc.flag_names for s in range(MAX_SLOTS)} <= set(kw)
    # the launch plan's view: each used slot's arguments and flags by their description names
    bound = dict(positional, **kw)
    views = desc.slots(bound)
    assert len(views) == 2 and all(views[s][n] == slots[s][0][n] for s in range(2) for n in desc.slot_names)
    if desc.has_ends:
        assert [(v["start"], v["end"]) for v in views] == [(0, 3), (3, 5)]


def test_pack_refuses_what_the_description_does_not_name():
    args = {n: 0 for n in K.DPRES.slot_names}
    with pytest.raises(TypeError, match="'extra'"):
        K.DPRES.pack([(dict(args, extra=1), K.DpreFlags())], [0, 1])
    missing = dict(args)
    del missing["gy"]
    with pytest.raises(TypeError, match="'gy'"):
        K.DPRES.pack([(missing, K.DpreFlags())], [0, 1])
    with pytest.raises(TypeError, match="DpreFlags"):
        K.DPRES.pack([(args, K.UpFlags())], [0, 1])


def test_flags_are_per_slot_compile_time_arguments():
    """Each field of a kernel's flags type is one compile-time argument per slot: no bit layouts."""
    flags = K.TileFlags(HAS_BIAS=True, DIRECT=True, DY=3, UX=2)
    args = {n: 0 for n in K.BLOCK.slot_names}
    _, kw = K.BLOCK.pack([(args, K.TileFlags()), (args, flags)], [0])
    assert {f.name: kw[f"{f.name}1"] for f in dataclasses.fields(flags)} == dataclasses.asdict(flags)
    assert kw["HAS_BIAS0"] is False and kw["DY2"] == 1  # unused slots: the defaults


def test_every_kernel_takes_eps_as_float64():
    """Triton passes a Python float to a kernel as float32 unless the parameter is typed: a float64 norm would
    then add eps rounded to float32 (1e-5 is off by 2.5e-14, ~1e-10 of the output at a variance of 1e-4: the
    H200 run's float64 batch-norm case over a 1x1 level). Every launched kernel types its eps parameters."""
    import inspect

    from msfused.triton import projection

    found = []
    for module in (K, projection):
        for name in dir(module):
            fn = getattr(module, name)
            while hasattr(fn, "fn"):  # autotuner -> jitted (or interpreted) function -> the Python function
                fn = fn.fn
            if name.endswith("_kernel") and callable(fn):
                found += [(name, p, str(a.annotation)) for p, a in inspect.signature(fn).parameters.items()
                          if re.fullmatch(r"eps\d?", p)]
    assert len({n for n, _, _ in found}) >= 5, found
    assert all(a in ("fp64", "tl.float64") for _, _, a in found), [f for f in found if f[2] not in ("fp64", "tl.float64")]
