"""Slotted kernels: up to ``MAX_SLOTS`` branches of different shapes in one launch, from one description.

A slotted kernel runs a per-branch program (a ``@triton.jit`` function of ``kernels.py``) for each of up to
four branches ("slots"); the program id picks the slot. Triton kernels take scalars and pointers, not lists,
so each slot has its own copy of every per-branch argument (``h0, h1, h2, h3``) and its own compile-time
values. ``Slotted`` describes such a kernel once: the arguments shared by every slot, the named per-slot
arguments, a dataclass of per-slot compile-time values (the kernel's *flags type*, shared by kernel and
launcher: no bit layouts), and the call that runs one slot's program written with the per-slot names.
From it come

* the kernel (``jit``): Python source generated with each slot's names suffixed by its index, compiled by
  ``triton.jit`` (Triton reads a kernel's source: the generated text is registered with ``linecache``);
* the launcher's arguments (``pack``): each slot given as a dict of its named arguments and a flags
  instance, checked against the description, flattened in the kernel's order;
* per-slot views of a launch's arguments for the launch plan's cost models (``slots``).

Generated source rather than tuple arguments (``slots[s]`` under ``tl.static_range``), because the
kernels keep flat named tensor arguments: torch.compile's ``wrap_triton`` tracks the tensors a kernel writes
by argument name (its functionalization reads the top-level tensor arguments) and sees no tensor inside a
tuple; and the generated kernels compile to the same PTX as the hand-unrolled kernels they replaced (sm_90,
four variants of every kernel compared), where tuple arguments did not (column_sums_kernel: 790 PTX lines
against 777, another control flow).
"""

from __future__ import annotations

import dataclasses
import functools
import keyword
import linecache
import re
import textwrap
from typing import Any, Dict, List, Optional, Sequence, Tuple, Type

import triton

MAX_SLOTS = 4
#: Scalar arguments given a type (by name, in every kernel): Triton passes a Python float as float32, which
#: would round a norm's eps for float64 kernels (kernels._rstd).
SCALAR_TYPES = {"eps": "tl.float64"}

_NAME = re.compile(r"\b[A-Za-z_]\w*\b")


def _names(text: str) -> List[str]:
    return [n.strip() for n in text.replace("\n", " ").split(",") if n.strip()]


@dataclasses.dataclass(frozen=True)
class NoFlags:
    """The flags type of a kernel without per-slot compile-time values."""


@dataclasses.dataclass(frozen=True)
class Slotted:
    """One slotted kernel.

    ``shared``: the leading arguments every slot reads (comma-separated names). ``slot``: each slot's named
    arguments. ``flags``: a frozen dataclass whose fields are each slot's compile-time values (their
    defaults fill unused slots). ``constexprs``: the kernel's own compile-time arguments (``SLOTS``, the
    number of slots in use, comes first). ``program``: one slot's program, a call written with the names of
    ``shared``, ``slot``, the flags' fields and ``constexprs``, and ``t``, the program's index among its slot's
    programs. Slot s runs programs [E_s, E_s+1): the ends come from the launcher (``ends=None``: arguments
    ``E0 .. E4``), or are computed in the kernel from ``ends``, an expression of one slot's program count
    (autotuned block sizes). ``prologue``: a call run by programs [0, E0) (``E0`` then an argument), else
    none. ``together``: instead, every program runs every slot's ``program`` in turn (a statement with
    ``acc``), between ``before`` and ``after`` (statements of the kernel's body)."""

    name: str
    doc: str
    shared: str
    slot: str
    program: str
    constexprs: str = ""
    flags: Type = NoFlags
    ends: Optional[str] = None
    prologue: Optional[str] = None
    together: bool = False
    before: str = ""
    after: str = ""

    # -- names (parsed once: the launchers pack a few launches per call) ----------------------------------
    @functools.cached_property
    def shared_names(self) -> List[str]:
        return _names(self.shared)

    @functools.cached_property
    def slot_names(self) -> List[str]:
        return _names(self.slot)

    @functools.cached_property
    def _slot_name_set(self) -> frozenset:
        return frozenset(self.slot_names)

    @functools.cached_property
    def flag_names(self) -> List[str]:
        return [f.name for f in dataclasses.fields(self.flags)]

    @functools.cached_property
    def _default_flags(self) -> Dict[str, Any]:
        """Each slot's flag values by suffixed name for unused slots, from the flags type's defaults."""
        defaults = self.flags()
        return {f"{n}{s}": getattr(defaults, n) for s in range(MAX_SLOTS) for n in self.flag_names}

    @property
    def has_ends(self) -> bool:
        """Whether the launcher passes the slots' program ranges ``E0 .. E4``."""
        return self.ends is None and not self.together

    @property
    def has_e0(self) -> bool:
        return self.has_ends or self.prologue is not None

    def per_slot(self, *names: str) -> List[str]:
        """The kernel's argument names of ``names`` for every slot (autotune keys)."""
        return [f"{n}{s}" for s in range(MAX_SLOTS) for n in names]

    def _suffix(self, text: str, s: int) -> str:
        local = set(self.slot_names) | set(self.flag_names)
        return _NAME.sub(lambda m: f"{m.group(0)}{s}" if m.group(0) in local else m.group(0), text)

    # -- the kernel ----------------------------------------------------------------------------------
    def source(self) -> str:
        """The kernel's Python source: the slots unrolled, each with its own suffixed names."""
        shared, slot, flags = self.shared_names, self.slot_names, self.flag_names
        consts = ["SLOTS"] + _names(self.constexprs)
        clash = (set(shared) | set(consts)) & {f"{n}{s}" for n in slot + flags for s in range(MAX_SLOTS)}
        assert not clash and not set(shared) & set(slot), (self.name, clash)
        assert all(n.isidentifier() and not keyword.iskeyword(n) for n in shared + slot + flags + consts)
        typed = lambda name, n: f"{name}: {SCALAR_TYPES[n]}" if n in SCALAR_TYPES else name  # noqa: E731
        params = [typed(n, n) for n in shared] + (["E0"] if self.has_e0 else [])
        for s in range(MAX_SLOTS):
            params += [typed(f"{n}{s}", n) for n in slot] + ([f"E{s + 1}"] if self.has_ends else [])
        params += [f"{n}{s}: tl.constexpr" for s in range(MAX_SLOTS) for n in flags]
        params += [f"{n}: tl.constexpr" for n in consts]
        lines = [f"def {self.name}({', '.join(params)}):", f'    """{self.doc}"""']
        if self.together:
            lines += [f"    {line}" for line in textwrap.dedent(self.before).strip().splitlines()]
            for s in range(MAX_SLOTS):
                lines += [f"    if SLOTS > {s}:", f"        {self._suffix(self.program, s)}"]
            lines += [f"    {line}" for line in textwrap.dedent(self.after).strip().splitlines()]
            return "\n".join(lines) + "\n"
        lines.append("    pid = tl.program_id(0)")
        if self.has_ends:
            starts = [f"E{s}" for s in range(MAX_SLOTS + 1)]
        else:  # each slot's program count from the (autotuned) block sizes
            first = "E0 + " if self.has_e0 else ""
            lines.append(f"    e1 = {first}{self._suffix(self.ends, 0)}")
            for s in range(1, MAX_SLOTS - 1):
                lines.append(f"    e{s + 1} = e{s} + {self._suffix(self.ends, s)}")
            starts = ["E0" if self.has_e0 else "0"] + [f"e{s}" for s in range(1, MAX_SLOTS)]
        branches = []
        if self.prologue is not None:
            branches.append(("pid < E0", self.prologue))
        for s in range(MAX_SLOTS):
            t = "pid" if starts[s] == "0" else f"pid - {starts[s]}"
            call = re.sub(r"\bt\b", t, self._suffix(self.program, s), count=1)
            cond = f"pid < {starts[s + 1]}" if s < MAX_SLOTS - 1 else None
            branches.append((cond, call if s == 0 else f"if SLOTS > {s}:\n            {call}"))
        for i, (cond, body) in enumerate(branches):
            head = "if" if i == 0 else "elif"
            lines.append(f"    {head} {cond}:" if cond is not None else "    else:")
            lines.append(f"        {body}")
        return "\n".join(lines) + "\n"

    def jit(self, namespace: Dict[str, Any]):
        """The kernel, compiled by ``triton.jit`` from ``source()`` in ``namespace`` (the module defining the
        per-slot programs)."""
        src = self.source()
        filename = f"<msfused generated {self.name}>"
        linecache.cache[filename] = (len(src), None, src.splitlines(True), filename)  # inspect.getsource reads it
        exec(compile(src, filename, "exec"), namespace)
        fn = namespace.pop(self.name)
        fn.__module__ = namespace.get("__name__", fn.__module__)
        return triton.jit(fn)

    # -- the launcher's side -------------------------------------------------------------------------
    def pack(self, slots: Sequence[Tuple[Dict[str, Any], Any]], ends: Optional[Sequence[int]] = None,
             filler: Optional[Dict[str, Any]] = None) -> Tuple[List[Any], Dict[str, Any]]:
        """(positional arguments after ``shared``, compile-time keyword arguments with ``SLOTS``) of a launch
        running ``slots``, each (its arguments by name, its flags). ``ends``: E_0 and each slot's end (when
        the kernel takes them). Unused slots take ``filler``'s arguments (if given; else the first slot's) and
        default flags: never read, ``SLOTS`` stops them."""
        assert len(slots) <= MAX_SLOTS and (slots or filler is not None), (self.name, len(slots))
        names, expected = self.slot_names, self._slot_name_set
        for args, flags in list(slots) + ([(filler, self.flags())] if filler is not None else []):
            if args.keys() != expected:
                raise TypeError(f"{self.name}: slot arguments {sorted(set(args) ^ expected)} do not match its "
                                "description")
            if not isinstance(flags, self.flags):
                raise TypeError(f"{self.name}: flags must be a {self.flags.__name__}, got {type(flags).__name__}")
        if self.has_e0:
            assert ends is not None and len(ends) == (len(slots) + 1 if self.has_ends else 1), (self.name, ends)
        flat = [ends[0]] if self.has_e0 else []
        unused = filler if filler is not None else slots[0][0]
        for s in range(MAX_SLOTS):
            args = slots[s][0] if s < len(slots) else unused
            flat += [args[n] for n in names]
            if self.has_ends:
                flat.append(ends[s + 1] if s < len(slots) else ends[-1])
        consts = {"SLOTS": len(slots), **self._default_flags}
        flag_names = self.flag_names
        for s, (_, flags) in enumerate(slots):
            consts.update({f"{n}{s}": getattr(flags, n) for n in flag_names})
        return flat, consts

    def slots(self, a: Dict[str, Any]) -> List[Dict[str, Any]]:
        """Per slot in use, its arguments and flags by their names in the description, plus ``start`` and
        ``end`` (its programs) where the launcher passes them: a launch's arguments (``a``: every argument
        by name, as the launch plan binds them) seen slot by slot."""
        views = []
        for s in range(a["SLOTS"]):
            view = {n: a[f"{n}{s}"] for n in self.slot_names + self.flag_names}
            if self.has_ends:
                view.update(start=a[f"E{s}"], end=a[f"E{s + 1}"])
            views.append(view)
        return views


def strided(name: str, t) -> Dict[str, Any]:
    """A tensor argument and its four strides, named ``name``, ``name_n``, ``name_c``, ``name_h``, ``name_w``."""
    n, c, h, w = t.stride()
    return {name: t, f"{name}_n": n, f"{name}_c": c, f"{name}_h": h, f"{name}_w": w}
