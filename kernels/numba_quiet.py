"""Quiet numba dispatcher clean-up: the `KeyError` tracebacks printed when numba-compiled functions are collected.

numba's dispatcher registers a weakref finalizer that walks `overloads.values()`, an OrderedDict keyed by the
compiled signatures (tuples of numba types). The OrderedDict walks its own key list and looks every key up again;
when a key's hash no longer matches the slot it was stored in, which happens to the signature tuples of the
functions ffcv compiles at run time (its loaders are built and dropped per epoch and per test), that lookup
raises `KeyError` inside the finalizer and Python prints "Exception ignored in: <finalize object>" with the
traceback, once per collected dispatcher (14 times in one test-suite run). The finalizer only releases the
compiled entry points, and reading the values straight from the dict's table (`dict.values`) needs no lookup, so
`install()` swaps numba's finalizer factory for one that does exactly that. Installed by the modules that compile
with numba (fastcl.kernels.cpu, fastcl.pipelines.ffcv_loader) before they create a dispatcher; idempotent.
"""
from __future__ import annotations


def release_finalizer(overloads, targetctx, shutting_down):
    """numba's dispatcher finalizer, reading the compiled results without key lookups."""

    def finalizer():
        if shutting_down():  # at interpreter exit the process frees everything anyway
            return
        for cres in list(dict.values(overloads)):
            try:
                targetctx.remove_user_function(cres.entry_point)
            except KeyError:
                pass

    return finalizer


def install() -> None:
    from numba.core import dispatcher, utils

    base = dispatcher._DispatcherBase
    if getattr(base, "_fastcl_quiet_finalizer", False):
        return

    def _make_finalizer(self):
        return release_finalizer(self.overloads, self.targetctx, utils.shutting_down)

    base._make_finalizer = _make_finalizer
    base._fastcl_quiet_finalizer = True
