"""Compiled CPU kernels, built on first use with :mod:`torch.utils.cpp_extension`.

One extension, ``channels_last.cpp``: batch-norm reductions and the input gradient for
channel-innermost CPU tensors (2-D ``(N, C)``, channels_last, channels_last_3d), accurate like
torch's NCHW kernels and each in one pass over memory. :mod:`normlab.functional` uses it when
:func:`channels_last` returns a module and falls back to torch operations (same numbers to
float32 precision, more passes) when it returns None.

The first call compiles the extension (about a minute; needs a C++ compiler with OpenMP and
ninja) into torch's extension cache (``$TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``); later processes load it from there in milliseconds. Linux only.
Set ``NORMLAB_NO_EXTENSION=1`` to never build or load it. A failed build warns once and is not
retried in the same process.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import threading
import time
import warnings
from pathlib import Path
from types import ModuleType

import torch

__all__ = ["channels_last", "disabled"]

_log = logging.getLogger(__name__)
_SOURCE = Path(__file__).with_name("channels_last.cpp")
_lock = threading.Lock()
_state: dict[str, ModuleType | None] = {}


def disabled() -> bool:
    """Whether ``NORMLAB_NO_EXTENSION`` turns the compiled kernels off."""
    return os.environ.get("NORMLAB_NO_EXTENSION", "") not in ("", "0")


def channels_last() -> ModuleType | None:
    """The compiled channel-innermost kernels, building them on the first call; None where they
    cannot be had (not Linux, disabled, or the build failed: a warning says why, once)."""
    if "module" in _state:
        return _state["module"]
    with _lock:
        if "module" not in _state:
            _state["module"] = _load()
    return _state["module"]


def _load() -> ModuleType | None:
    if disabled() or not sys.platform.startswith("linux"):
        return None
    try:
        from torch.utils import cpp_extension

        _ensure_ninja_on_path()
        capability = torch.backends.cpu.get_cpu_capability()
        vector_flags = ["-mavx2", "-mfma"] if capability in ("AVX2", "AVX512") else []
        # The name carries torch's version and the instruction set: a cached build made for
        # another torch or another CPU (a shared home directory) is never loaded by mistake.
        tag = re.sub(r"\W", "_", f"{torch.__version__}_{'avx2' if vector_flags else 'base'}")
        # A warning, so that it reaches a log or a CI job as well as a terminal (Python's
        # last-resort handler prints it on stderr when the application configured no logging):
        # whoever waits a minute sees why.
        name = f"normlab_channels_last_{tag}"
        _clear_stale_lock(name)
        if _needs_build(name):
            _log.warning("normlab: compiling its channels_last CPU kernel, once (about a minute)...")
        return cpp_extension.load(
            name=name,
            sources=[str(_SOURCE)],
            extra_cflags=["-O3", "-fopenmp", *vector_flags],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as error:  # noqa: BLE001 - any build failure means: use the fallback
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        warnings.warn(
            f"normlab could not build its compiled CPU kernels ({type(error).__name__}: {reason}); "
            "batch norm on channel-innermost CPU input (2-D, channels_last) uses torch operations "
            "instead: the same accuracy, about 1.3-2x slower. Install a C++ compiler with OpenMP "
            "and ninja to get them, or set NORMLAB_NO_EXTENSION=1 to silence this warning.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


def _needs_build(name: str) -> bool:
    """Whether torch's extension cache lacks the built library (then loading it compiles it)."""
    try:
        from torch.utils.cpp_extension import _get_build_directory  # private, stable since torch 1.x

        return not (Path(_get_build_directory(name, verbose=False)) / f"{name}.so").is_file()
    except Exception:  # noqa: BLE001 - when unsure, say that it may take a minute
        return True


# A build takes about a minute (up to ten on two busy cores); a lock older than this was left
# by a build that was killed (Ctrl-C, a timeout), and torch would wait for it forever.
STALE_LOCK_SECONDS = 20 * 60


def _clear_stale_lock(name: str) -> bool:
    """Remove the extension's build lock when a killed build left it behind; True if removed.

    torch's loader creates ``<build dir>/lock`` while it builds or checks the extension and
    every other process waits, without a timeout, until the file is gone: one interrupted build
    would hang every later process. A lock untouched for :data:`STALE_LOCK_SECONDS` is stale.
    """
    try:
        from torch.utils.cpp_extension import _get_build_directory

        lock = Path(_get_build_directory(name, verbose=False)) / "lock"
        age = time.time() - lock.stat().st_mtime
    except (OSError, ImportError):
        return False
    if age < STALE_LOCK_SECONDS:
        return False
    try:
        lock.unlink()
    except OSError:
        return False
    _log.warning("normlab: removed the compiled kernel's build lock %s, left %.0f minutes ago by an interrupted "
                 "build", lock, age / 60)
    return True


def _ensure_ninja_on_path() -> None:
    # The ninja wheel puts its binary next to the interpreter, which is not on PATH when a
    # virtual environment's python runs without activation.
    if shutil.which("ninja") is None:
        candidates = [Path(sys.executable).parent]
        try:
            import ninja

            candidates.insert(0, Path(ninja.BIN_DIR))
        except ImportError:
            pass
        for directory in candidates:
            if (directory / "ninja").exists():
                os.environ["PATH"] = f"{directory}{os.pathsep}{os.environ.get('PATH', '')}"
                return
