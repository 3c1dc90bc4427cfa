"""Small file helpers for run folders: atomic writes, so an interrupted run never leaves half a file."""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterable

__all__ = ["atomic_write_bytes", "atomic_write_text", "append_jsonl", "make_folder", "read_jsonl", "write_jsonl"]


def make_folder(path: Path, *, what: str = "the run folder", option: str = "--out") -> None:
    """Create the folder ``path`` (and its parents) and check that files can be written in it.

    Raises:
        ValueError: one line naming the folder, why it cannot be used (a file stands there or on
            its way, the system refuses to create it, or it is not writable) and to choose
            another ``option``.
    """
    path = Path(path)
    fix = f"choose another {option}"
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what} {str(path)!r} is an existing file, not a folder; {fix}.")
    blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise ValueError(f"{what} {str(path)!r} cannot be created: {str(blocker)!r} is a file, not a folder; {fix}.")
    try:
        path.mkdir(parents=True, exist_ok=True)
        # mkdir can succeed where files cannot be written (read-only mounts, permissions)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".normlab-write-check.")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise ValueError(f"{what} {str(path)!r} cannot be created or written ({reason}); {fix}.") from None


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: Path, text: str) -> None:
    """:func:`atomic_write_bytes` for UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def append_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """Append rows as JSON lines and flush them to disk."""
    with open(path, "a", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def read_jsonl(path: Path, *, warn: bool = True) -> list[dict[str, Any]]:
    """The JSON objects of a JSON-lines file, in order; blank lines are ignored.

    An unreadable *last* line is the torn tail of an interrupted append: it is dropped (with a
    ``UserWarning`` when ``warn``). Any other bad line raises a ``ValueError`` naming the file
    and the line number.
    """
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    rows: list[dict[str, Any]] = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            if i == last:
                if warn:
                    warnings.warn(
                        f"{path}: skipped line {i + 1}, a partial last line (an interrupted write?): {line[:80]!r}",
                        UserWarning,
                        stacklevel=2,
                    )
                continue
            raise ValueError(f"{path}: line {i + 1} is not valid JSON ({err.msg}): {line[:80]!r}") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}: line {i + 1} must be a JSON object, got {type(row).__name__}: {line[:80]!r}")
        rows.append(row)
    return rows


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """Replace ``path`` atomically with ``rows`` as JSON lines."""
    atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in rows))
