"""Atomic file writes: a temporary file beside the target, then a rename.

A crash or a full disk leaves the previous file (or none), never a half-written one.
"""

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

from lossx.errors import LossxError


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomically(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Call `write` on a temporary file beside `path`, then rename it to `path`."""
    path = Path(path)
    temporary = None
    try:
        with tempfile.NamedTemporaryFile(
            dir=path.parent, prefix=f".{path.name}.", delete=False
        ) as f:
            temporary = Path(f.name)
            write(f)
        temporary.chmod(0o666 & ~current_umask())  # temporary files are private; results not
        os.replace(temporary, path)
    except OSError as e:
        if temporary is not None:
            temporary.unlink(missing_ok=True)
        raise LossxError(f"cannot write {path}: {e.strerror or e}") from None
