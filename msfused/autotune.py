"""``'auto'`` on CUDA: the backend of a call chosen by measurement on the user's own GPU.

The first eager call with a new **key** (the block's configuration, ``x``'s shape, dtype and memory format,
each norm's mode, whether autograd records the call, the autocast dtype, the GPU) times the candidates on
scratch copies, keeps the fastest for that key, then runs the user's call once with it:

* **Candidates**: the fused backends that can run the call ('cuda', 'triton'), plus the reference composition
  for keys that record no gradient. The reference's CUDA backward uses atomics (not bit-identical run to
  run, SPEC.md), so in training it is a candidate only with ``MSFUSED_AUTOTUNE=any``.
* **Scratch copies**: ``x`` detached, the branches deep-copied (parameters and norm buffers), so measuring
  updates no running statistics and touches nothing the caller passed; no random number is drawn (the
  upstream gradient is ones). Keys that record gradients time forward plus backward.
* **Timing**: a warm-up call, then a few calls between CUDA events on the current stream; the median.
  The fastest wins; an exact tie goes to the preferred one (the fixed order, the reference last). A candidate
  that raises while measured is dropped for that key with one warning; the user's call never fails
  because of measuring.
* **Never while tracing or capturing**: under ``torch.compile`` / ``torch.export`` (``torch.compiler.
  is_compiling()``) or while the current stream captures a CUDA graph, nothing is timed: the key's cached
  choice is used, else the fixed order. Call :func:`warmup` (or run the model once eagerly) before compiling
  or capturing. The reference is timed eagerly, so under ``torch.compile`` the guarantee is against eager
  PyTorch (a compiled naive block may be faster than both).
* ``MSFUSED_AUTOTUNE=0``: no measurement, the fixed order 'cuda', 'triton', then the reference: 'cuda' first
  because its convolutions are cuDNN's and nothing compiles at the first call, where Triton compiles and
  autotunes its kernels per shape (seconds per new shape); a deterministic choice that never stalls.
* **DDP / several processes**: no collective runs inside ``forward``, so ranks may measure different
  winners (both correct, possibly not bit-identical). To make every rank agree, :func:`save` a table once
  and :func:`load` it on every rank (or set ``MSFUSED_AUTOTUNE_FILE``), or call :func:`warmup` on rank 0,
  save, and load everywhere before wrapping the model.

:func:`report` (and ``python -m msfused info``) shows the choices with the measured times; :func:`save` /
:func:`load` keep them in a JSON file (a bad or stale file gives one clear warning and is ignored: the keys
are measured again). Tests replace the timer (:func:`set_timer`) and the measured device types
(``MEASURED_DEVICES``) to run all of this on a CPU.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import statistics
import threading
import warnings
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import torch
from torch import nn

from .naive import conv_and_norm

ENV_VAR = "MSFUSED_AUTOTUNE"
FILE_ENV_VAR = "MSFUSED_AUTOTUNE_FILE"
#: Preference order: the fixed order without measurement, and how exact ties are broken.
ORDER = ("cuda", "triton", "cpu", "reference")
#: Device types whose 'auto' calls are measured (tests add 'cpu' with a stand-in timer).
MEASURED_DEVICES = {"cuda"}
_FORMAT = 1

#: (fn, device, candidate) -> milliseconds of one call of ``fn``; see :func:`cuda_event_timer`.
Timer = Callable[[Callable[[], Any], torch.device, str], float]


@dataclasses.dataclass
class Choice:
    """The backend kept for one key, and what was measured (ms per candidate; errors of dropped ones)."""

    backend: str
    times_ms: Dict[str, float]
    errors: Dict[str, str]


_table: Dict[str, Choice] = {}
_checked: set = set()  # keys whose backend is known to run here (measured, or checked once after loading)
_lock = threading.RLock()
_loaded_env_file: List[str] = []


def cuda_event_timer(fn: Callable[[], Any], device: torch.device, candidate: str, warmup: int = 2,
                     reps: int = 7) -> float:
    """Median milliseconds of ``reps`` calls of ``fn`` after ``warmup``, between CUDA events on the current
    stream. Two warm-up calls: the first of a new shape compiles or autotunes (Triton) and allocates. (With
    one, the first H200 run measured Triton training steps at 3-14x the benchmark's later times, cause not
    yet known; the GPU check's diagnostics measure every key again once warm.)"""
    for _ in range(warmup):
        fn()
    stream = torch.cuda.current_stream(device)
    pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in pairs:
        start.record(stream)
        fn()
        end.record(stream)
    pairs[-1][1].synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in pairs)


_timer: Timer = cuda_event_timer


def set_timer(timer: Optional[Timer]) -> Timer:
    """Replaces the timer (None: CUDA events again); returns the previous one. For tests and experiments."""
    global _timer
    previous = _timer
    _timer = timer or cuda_event_timer
    return previous


def mode() -> str:
    """``MSFUSED_AUTOTUNE``: '1' (default: measure), '0' (the fixed order) or 'any' (measure; the reference
    is a candidate in training too)."""
    value = os.environ.get(ENV_VAR, "1") or "1"
    if value not in ("0", "1", "any"):
        raise ValueError(f"the environment variable {ENV_VAR} must be 0, 1 or any, got {value!r}")
    return value


def _tracing(x: torch.Tensor) -> bool:
    if torch.compiler.is_compiling():
        return True
    exporting = getattr(torch.compiler, "is_exporting", None)
    return bool(exporting and exporting()) or isinstance(x, torch._subclasses.FakeTensor)


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _norm_mode(norm: nn.Module) -> str:
    if not isinstance(norm, nn.modules.batchnorm._BatchNorm):
        return "-"
    return "train" if norm.training else ("eval" if norm.running_mean is not None else "eval-batch")


_spec_texts: Dict[int, tuple] = {}


def _spec_text(spec) -> str:
    """The block configuration's part of a key (its projection included), formatted once per spec object."""
    if torch.compiler.is_compiling():
        return _format_spec(spec)
    hit = _spec_texts.get(id(spec))
    if hit is None or hit[0] is not spec:  # (the spec is kept in the entry: its id is not reused meanwhile)
        if len(_spec_texts) >= 4096:  # specs made per call (none today) would otherwise pile up
            _spec_texts.clear()
        hit = _spec_texts[id(spec)] = (spec, _format_spec(spec))
    return hit[1]


def _format_spec(spec) -> str:
    b = ";".join(f"{br.factor},{br.bins[0]}x{br.bins[1]},{br.out_channels},{br.kernel_size},{br.bias},{br.norm}"
                 for br in spec.branches)
    p = spec.project
    proj = "-" if p is None else f"{p.out_channels},{p.kernel_size},{p.bias},{p.norm},{p.activation}"
    return (f"{spec.in_channels}|{b}|{spec.down_mode}|{spec.up_mode}|{spec.align_corners}|{spec.activation}|"
            f"{spec.input_position}|project={proj}")


_key_texts: Dict[tuple, str] = {}


def key(x: torch.Tensor, spec, branches: Sequence[nn.Module], needs_grad: bool,
        project: Optional[nn.Module] = None) -> str:
    """The measurement key of a call (plain string formatting when traced, so that torch.compile can trace
    it; in eager calls formatted once per distinct call, the text looked up by what it is made of)."""
    parts = [*branches, project] if project is not None else branches
    norms = tuple(_norm_mode(conv_and_norm(part)[1]) for part in parts)
    device_type = x.device.type
    cast = torch.get_autocast_dtype(device_type) if _autocast_on(device_type) else None
    if torch.compiler.is_compiling():
        return _format_key(x, _spec_text(spec), norms, needs_grad, cast)
    made_of = (_spec_text(spec), x.shape, x.stride(), x.dtype, norms, needs_grad, cast, x.device)
    text = _key_texts.get(made_of)
    if text is None:
        if len(_key_texts) >= 4096:  # (a bound, as _spec_texts')
            _key_texts.clear()
        text = _key_texts[made_of] = _format_key(x, made_of[0], norms, needs_grad, cast)
    return text


def _format_key(x: torch.Tensor, spec_text: str, norms: tuple, needs_grad: bool, cast) -> str:
    fmt = "cl" if torch._prims_common.suggest_memory_format(x) == torch.channels_last else "nchw"
    return (f"{spec_text}|{tuple(x.shape)}|{x.dtype}|{fmt}|{','.join(norms)}|grad={needs_grad}|"
            f"autocast={'-' if cast is None else cast}|{x.device}")


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return False


class Call:
    """One call of the block, as 'auto' measures it: ``run(x, branches, backend, project=project)`` computes
    the block (and its projection, if any) with ``backend``; :meth:`scratch_step` gives a callable that does so
    on scratch copies."""

    def __init__(self, x: torch.Tensor, spec, branches: Sequence[nn.Module], needs_grad: bool,
                 run: Callable[..., torch.Tensor], project: Optional[nn.Module] = None):
        self.x, self.spec, self.branches, self.needs_grad, self.run = x, spec, branches, needs_grad, run
        self.project = project

    def key(self) -> str:
        return key(self.x, self.spec, self.branches, self.needs_grad, self.project)

    def scratch_step(self, backend: str) -> Callable[[], Any]:
        with torch.no_grad():  # parameters and norm buffers copied: the caller's stay untouched
            branches, project = copy.deepcopy((self.branches, self.project))
        x = self.x.detach()
        if not self.needs_grad:
            return lambda: self.run(x, branches, backend, project=project)
        x = x.requires_grad_(self.x.requires_grad)
        params = [*branches.parameters(), *(project.parameters() if project is not None else [])]
        inputs = ([x] if x.requires_grad else []) + [p for p in params if p.requires_grad]

        def step():
            out = self.run(x, branches, backend, project=project)
            return torch.autograd.grad(out, inputs, torch.ones_like(out))  # no random number drawn

        return step


def known_choice(call: Call) -> Optional[str]:
    """The backend already chosen for ``call``'s key (measured, or loaded from a table), or None: the per-call
    fast path of 'auto' (a key's shape, dtype and device are what its candidates' checks read)."""
    if call.x.device.type not in MEASURED_DEVICES or mode() == "0":
        return None
    _load_env_file()
    k = call.key()
    known = _table.get(k)
    # a loaded key goes through choose() once, which checks that its backend can run here
    return known.backend if known is not None and k in _checked else None


def choose(candidates: Sequence[str], call: Call) -> str:
    """The backend for ``call`` among ``candidates`` (the fused backends that can run it, preferred first):
    the key's measured choice (measured now if new), or the fixed order where nothing may be measured."""
    fixed = candidates[0] if candidates else "reference"
    if call.x.device.type not in MEASURED_DEVICES or mode() == "0":
        return fixed
    _load_env_file()
    k = call.key()
    known = _table.get(k)
    if known is not None and (known.backend in candidates or known.backend == "reference"):
        _checked.add(k)
        return known.backend
    if _tracing(call.x) or _capturing(call.x.device):
        return fixed
    with_reference = list(candidates) + (["reference"] if not call.needs_grad or mode() == "any" else [])
    return _measure(k, with_reference, call).backend


def _measure(k: str, candidates: Sequence[str], call: Call) -> Choice:
    with _lock:
        if k in _table and _table[k].backend in candidates:  # measured meanwhile by another thread
            return _table[k]
        times: Dict[str, float] = {}
        errors: Dict[str, str] = {}
        if len(candidates) > 1:
            for name in candidates:
                try:
                    times[name] = float(_timer(call.scratch_step(name), call.x.device, name))
                except Exception as e:  # noqa: BLE001  (dropped for this key; the user's call goes on)
                    errors[name] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
                    warnings.warn(f"msfused autotune: backend {name!r} failed while being measured and is dropped "
                                  f"for this call's key ({errors[name]}); key: {k}", RuntimeWarning, stacklevel=5)
        ranked = sorted(times, key=lambda n: (times[n], list(candidates).index(n)))  # a tie: the preferred
        if ranked:
            backend = ranked[0]
        else:  # one candidate, or every one failed: the fused one if it measured nothing, else the reference
            backend = candidates[0] if len(candidates) == 1 else "reference"
        choice = Choice(backend, times, errors)
        _table[k] = choice
        _checked.add(k)
        return choice


# ---------------------------------------------------------------------------------------------------
# Seeing, keeping and sharing the table
# ---------------------------------------------------------------------------------------------------


def table() -> Dict[str, Choice]:
    """A copy of the table: key -> :class:`Choice`."""
    with _lock:
        return {k: dataclasses.replace(v, times_ms=dict(v.times_ms), errors=dict(v.errors)) for k, v in _table.items()}


def clear() -> None:
    """Forgets every choice (the next call of each key measures again)."""
    with _lock:
        _table.clear()
        _checked.clear()


def report() -> str:
    """The choices with their measured times, one key per line (empty table: says so)."""
    _load_env_file()
    rows = table()
    lines = [f"autotune ({ENV_VAR}={os.environ.get(ENV_VAR, '1') or '1'}): {len(rows)} key(s)"]
    for k, choice in sorted(rows.items()):
        times = ", ".join(f"{n} {t:.3f} ms" for n, t in sorted(choice.times_ms.items(), key=lambda i: i[1]))
        dropped = "".join(f"; {n} dropped ({e})" for n, e in choice.errors.items())
        lines.append(f"  {k}: {choice.backend}" + (f" ({times}{dropped})" if times or dropped else " (not timed)"))
    return "\n".join(lines)


def _stamp() -> Dict[str, Any]:
    """What a table is only valid for: the versions, and the GPUs (keys name devices by index)."""
    from ._version import __version__

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return {"msfused": __version__, "torch": torch.__version__, "gpus": gpus}


def save(path: str) -> None:
    """Writes the table to ``path`` (JSON, with the msfused and torch versions and the GPUs it was measured on)."""
    data = {"format": _FORMAT, **_stamp(),
            "entries": {k: dataclasses.asdict(v) for k, v in table().items()}}
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def load(path: str) -> int:
    """Adds the choices saved in ``path`` to the table; returns how many. A missing, unreadable, malformed or
    stale file (another msfused or torch version, other GPUs) gives one warning saying why and loads nothing: those keys
    are measured again. Never raises for the file's content."""
    try:
        with open(path) as f:
            data = json.load(f)
        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            raise ValueError(f"not an msfused autotune table of format {_FORMAT}")
        stale = {k: (data.get(k), v) for k, v in _stamp().items() if data.get(k) != v}
        if stale:
            raise ValueError("measured with " + ", ".join(f"{k} {old} (this is {new})" for k, (old, new) in stale.items()))
        entries = {}
        for k, v in data["entries"].items():
            choice = Choice(str(v["backend"]), {str(n): float(t) for n, t in v["times_ms"].items()},
                            {str(n): str(e) for n, e in v.get("errors", {}).items()})
            if choice.backend not in ORDER:
                raise ValueError(f"unknown backend {choice.backend!r}")
            entries[str(k)] = choice
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        warnings.warn(f"msfused autotune: ignoring the table in {path}: {type(e).__name__}: {e}; the keys will be "
                      "measured again", RuntimeWarning, stacklevel=2)
        return 0
    with _lock:
        _table.update(entries)
        _checked.difference_update(entries)
    return len(entries)


def _load_env_file() -> None:
    """Loads ``MSFUSED_AUTOTUNE_FILE`` once per process, if set."""
    path = os.environ.get(FILE_ENV_VAR)
    if path and path not in _loaded_env_file and not torch.compiler.is_compiling():
        _loaded_env_file.append(path)
        if os.path.exists(path):
            load(path)


@contextlib.contextmanager
def _model_state_kept(model: nn.Module) -> Iterator[None]:
    """Restores every buffer of ``model`` (running statistics, counts) and the RNG states on the way out."""
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    devices = sorted({b.device.index or 0 for b, _ in buffers if b.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            with torch.no_grad():
                for b, saved in buffers:
                    b.copy_(saved)


def warmup(model: nn.Module, *example_inputs: Any, train: Optional[bool] = None) -> str:
    """Fills the table for ``model``'s msfused blocks on ``example_inputs`` before ``torch.compile``, CUDA graph
    capture or DDP: one forward without gradient, and (``train``, default: some parameter requires grad)
    one forward and backward with it, in the model's current mode. The model is left as it was (buffers,
    ``.grad``, RNG state). Returns :func:`report`."""
    if train is None:
        train = any(p.requires_grad for p in model.parameters())
    with _model_state_kept(model):
        with torch.no_grad():
            model(*example_inputs)
        if train:
            params = [p for p in model.parameters() if p.requires_grad]
            with torch.enable_grad():
                out = model(*example_inputs)
                outs = [o for o in (out if isinstance(out, (tuple, list)) else [out])
                        if isinstance(o, torch.Tensor) and o.requires_grad]
                if outs and params:
                    torch.autograd.grad(outs, params, [torch.ones_like(o) for o in outs], allow_unused=True)
    return report()
