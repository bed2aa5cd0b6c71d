"""Bringing in torch: one line naming the missing extra where it is not installed, and the first
import of torch's side paid once. This module itself imports no torch."""

import atexit
import gc
import importlib
import importlib.util
import sys

from lossx.errors import EnvironmentProblem

EXPORT_EXTRA = "pip install 'lossx[export]'"


def require_export_extra(what: str, modules: tuple[str, ...] = ("torch", "onnxscript")) -> None:
    """Exit 3 in one line where the `export` extra (torch and the exporter) is not installed."""
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        raise EnvironmentProblem(
            f"{what} needs {' and '.join(missing)}, which this install lacks; install "
            f"{EXPORT_EXTRA}"
        )


def import_for_good(module: str) -> None:
    """Import `module` (torch and its exporter: some 340k objects that live until exit) with
    the garbage collector paused, then freeze every object, now and again at exit: collections
    found little to free among them, yet each full one, the last at exit included, walked them
    all (about 1 s of an export here). Only a first import does this, so a process that had
    imported it before (a test session) keeps its own collector as it was."""
    if module in sys.modules:
        return
    enabled = gc.isenabled()
    gc.disable()
    try:
        importlib.import_module(module)
    finally:
        if enabled:
            gc.enable()
    gc.freeze()
    atexit.register(gc.freeze)
