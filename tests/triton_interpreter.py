"""Triton's interpreter without a repeated patch: the suite's interpreted kernels at the same semantics, faster.

Before it runs a kernel, Triton 3.6's interpreter swaps ``triton.language``'s builtins (``tl.load``,
``tl.sum``, the tensor methods, ``tl.math``) for interpreted ones (``_patch_lang``: ``inspect.getmembers`` over
those modules), and puts them back when the launch ends. It does the same again at every call of a
``@triton.jit`` helper from inside a kernel, in every program: the modules are already patched by then, so the
repeat finds no builtin left to swap, yet it walks the modules each time. In a cProfile of
``test_triton.py::test_small_blocks[tr_six...]`` that was 66,000 calls and a quarter of the test's time.

``patch_lang_once()`` skips a helper call's repeat while a launch has already patched the same language
modules (the ``triton.language`` / ``triton.language.core`` objects the helper's globals name). A helper that
names one the launch did not patch is patched as Triton does it. Nothing else changes: the same interpreted
builtins run the same kernels.

Relies on the interpreter's module layout (``triton.runtime.interpreter``: ``_patch_lang`` and ``GridExecutor``;
written against Triton 3.6); with another layout it does nothing.
"""

from __future__ import annotations

import contextlib
import inspect
import threading

try:
    import triton.language as tl
    from triton.runtime import interpreter as _interp
except ImportError:  # pragma: no cover - Triton missing: nothing to patch
    _interp = None

_state = threading.local()  # .patched: per running launch (a stack), the language modules patched


class _NothingToRestore:
    def restore(self) -> None:
        pass


def _languages(fn) -> frozenset:
    return frozenset(id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core))


@contextlib.contextmanager
def patch_lang_once():
    """Within this context, a launch patches Triton's language modules once (see the module)."""
    if _interp is None or not hasattr(_interp, "_patch_lang") or not hasattr(_interp, "GridExecutor"):
        yield
        return
    saved_patch, saved_call = _interp._patch_lang, _interp.GridExecutor.__call__
    languages = {}  # fn -> its language modules' ids

    def patch_lang(fn):
        langs = languages.get(fn)
        if langs is None:
            langs = languages[fn] = _languages(fn)
        stack = getattr(_state, "patched", None)
        if stack and langs <= stack[-1]:
            return _NothingToRestore()
        scope = saved_patch(fn)
        if stack:
            stack[-1] = stack[-1] | langs
        return scope

    def call(self, *args, **kwargs):
        stack = _state.__dict__.setdefault("patched", [])
        stack.append(frozenset())
        try:
            return saved_call(self, *args, **kwargs)
        finally:
            stack.pop()

    _interp._patch_lang, _interp.GridExecutor.__call__ = patch_lang, call
    try:
        yield
    finally:
        _interp._patch_lang, _interp.GridExecutor.__call__ = saved_patch, saved_call
