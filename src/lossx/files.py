"""Files in and out: atomic writes, and the checks every path gets before any work.

A write goes to a temporary file beside the target, then a rename: a crash, a full disk or an
interruption leaves the previous file (or none), never a half-written one. An input must be a
regular file (a FIFO would block the read, a device never end it); an output's folder must exist
and be writable before the work that produces it starts.
"""

import contextlib
import fcntl
import glob
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
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
    except BaseException as e:  # an interruption too: the temporary file never stays behind
        if temporary is not None:
            temporary.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise LossxError(f"cannot write {path}: {e.strerror or e}") from None
        raise


def _mode(path: Path, what: str, error: type[LossxError]) -> int:
    """`path`'s st_mode, or `error` saying it does not exist or cannot be looked at."""
    try:
        return path.stat().st_mode
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist") from None
    except (OSError, ValueError) as e:  # ValueError: a NUL byte in the name
        raise error(f"{what} {path}: {getattr(e, 'strerror', None) or e}") from None


def regular_file(path: Path, what: str, error: type[LossxError] = LossxError) -> Path:
    """`path` if it is a readable regular file, else `error` saying what it is instead."""
    path = Path(path)
    mode = _mode(path, what, error)
    if stat.S_ISDIR(mode):
        raise error(f"{what} {path} is a folder, not a file")
    if not stat.S_ISREG(mode):
        raise error(f"{what} {path} is not a regular file (a FIFO, socket or device)")
    if not os.access(path, os.R_OK):
        raise error(f"{what} {path} is not readable")
    return path


def output_file(path: Path, what: str) -> Path:
    """`path` if a file can be written there: its folder exists and a file can be made in it
    (made and removed: permission bits do not tell, e.g. /proc to root), and it is not a folder
    itself. Checked before the work, not after it."""
    path = Path(path)
    folder = path.parent
    if path.is_dir():
        raise LossxError(f"cannot write {what} {path}: it is a folder; give a file name")
    if not folder.exists():
        raise LossxError(f"cannot write {what} {path}: folder {folder} does not exist")
    if not folder.is_dir():
        raise LossxError(f"cannot write {what} {path}: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise LossxError(f"cannot write {what} {path}: folder {folder} is not writable")
    if path.exists() and not stat.S_ISREG(path.stat().st_mode):
        raise LossxError(f"cannot write {what} {path}: it is not a regular file")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{path.name}.probe."):
            pass
    except OSError as e:
        raise LossxError(
            f"cannot write {what} {path}: no file can be made in {folder} ({e.strerror or e})"
        ) from None
    return path


def input_folder(path: Path, what: str, error: type[LossxError] = LossxError) -> Path:
    """`path` if it is a folder, else `error` saying whether it is missing or a file."""
    path = Path(path)
    if not stat.S_ISDIR(_mode(path, what, error)):
        raise error(f"{what} {path} is a file, not a folder")
    return path


_STAGED, _REPLACED = ".partial", ".old"  # suffixes of the hidden siblings of a folder being written


def check_destination(folder: Path, marker: str, error: type[LossxError] = LossxError) -> Path:
    """`folder` as an absolute path, if a folder of results may be written there: absent, an
    empty folder, or one holding `marker` (earlier results, which are replaced), writable, and
    not the current directory when it would be replaced. Checked before the work."""
    folder = Path(os.path.abspath(folder))
    if folder.exists():
        if not folder.is_dir():
            raise error(f"{folder} exists and is not a folder")
        has_entries = any(folder.iterdir())
        if has_entries and not (folder / marker).is_file():
            raise error(f"{folder} exists and is not a lossx artifact; refusing to overwrite it")
        marked = not folder.stat().st_mode & stat.S_IWUSR  # read-only even to root
        if marked or not os.access(folder, os.W_OK | os.X_OK):
            raise error(f"{folder} is read-only; refusing to replace it")
        if has_entries and folder == Path.cwd():
            raise error(
                f"{folder} is the current directory; write the new artifact from its parent"
            )
    parent = folder.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise error(f"cannot create {parent}: {e.strerror}") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise error(f"cannot write {folder}: folder {parent} is not writable")
    try:  # made and removed: permission bits do not tell (e.g. /proc to root)
        os.rmdir(tempfile.mkdtemp(prefix=f".{folder.name}.probe.", dir=parent))
    except OSError as e:
        raise error(
            f"cannot write {folder}: no folder can be made in {parent} ({e.strerror or e})"
        ) from None
    return folder


def write_folder_atomically(
    folder: Path, write: Callable[[Path], object], error: type[LossxError] = LossxError
) -> object:
    """Call `write` on a hidden sibling of `folder`, then put it in `folder`'s place; return
    what `write` returned. On any failure or interruption `folder` is as it was and the sibling
    is gone; one left by a killed process is removed by the next write to `folder`."""
    folder = Path(folder)
    _remove_stale_siblings(folder)
    staged = None
    try:
        staged = Path(tempfile.mkdtemp(prefix=_sibling_prefix(folder), suffix=_STAGED,
                                       dir=folder.parent))  # fmt: skip
        staged.chmod(0o777 & ~current_umask())  # mkdtemp makes it private; results are not
        result = write(staged)
        _move_into_place(staged, folder)
        return result
    except OSError as e:  # disk full, permissions
        raise error(f"cannot write the artifact to {folder}: {e.strerror or e}") from None
    finally:
        if staged is not None and staged.exists():
            shutil.rmtree(staged, ignore_errors=True)


def _sibling_prefix(folder: Path) -> str:
    return f".{folder.name}.{os.getpid()}-"


def _move_into_place(staged: Path, folder: Path) -> None:
    """Put `staged` where `folder` is. An empty `folder` is filled (it may be a mount point or
    the current directory, which cannot be renamed); a full one is swapped whole, and survives
    any failure."""
    if not folder.exists():
        staged.rename(folder)
        return
    if not any(folder.iterdir()):
        for entry in staged.iterdir():
            entry.rename(folder / entry.name)
        return
    previous = Path(tempfile.mkdtemp(prefix=_sibling_prefix(folder), suffix=_REPLACED,
                                     dir=folder.parent))  # fmt: skip
    previous.rmdir()
    folder.rename(previous)
    try:
        staged.rename(folder)
    except OSError:
        previous.rename(folder)
        raise
    shutil.rmtree(previous, ignore_errors=True)


def _remove_stale_siblings(folder: Path) -> None:
    """Remove the hidden siblings of `folder` that a killed write left behind (their process is
    gone); those of a write still running stay."""
    prefix = f".{folder.name}."
    for sibling in folder.parent.glob(f"{glob.escape(prefix)}*"):
        pid = sibling.name[len(prefix) :].partition("-")[0]
        if sibling.suffix in (_STAGED, _REPLACED) and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(sibling, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@contextlib.contextmanager
def sole_writer(target: Path, error: type[LossxError] = LossxError) -> Iterator[None]:
    """Hold the right to write `target` (a file or a folder) while the block runs: an advisory
    lock (flock) on a hidden `.NAME.lock` beside it, which names its holder's pid and is removed
    when the block ends. Another process that wants to write the same target meanwhile gets
    `error` at once, instead of both working and the last one silently winning."""
    target = Path(os.path.abspath(target))
    lock = target.parent / f".{target.name}.lock"
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise error(f"cannot write {target}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise error(
                f"{target} is being written by another process right now (pid {holder}); wait "
                "for it to finish, or write elsewhere"
            ) from None
        try:  # its last holder may have removed the file between our open and our lock
            current = os.stat(lock).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(fd).st_ino:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            lock.unlink()
        os.close(fd)
