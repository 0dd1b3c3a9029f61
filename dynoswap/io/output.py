"""Outputs that never destroy data: locked, crash-safe replacement of a file or folder.

``replace_output(path, kind, force)`` is the one way dynoswap writes an output:

1. It takes an exclusive lock on a sibling lock file (``fcntl.flock``): a second writer
   to the same path fails at once with :class:`~dynoswap.errors.OutputLockedError`.
2. It repairs what a killed writer left (:func:`repair`): a finished but interrupted
   swap is completed, an unfinished one rolled back, partial work removed.
3. An existing output is replaced only with ``force`` and only if it is a dynoswap
   output of the same ``kind`` (a saved model folder, a training run, ...); anything
   else is refused with a line saying what is there.
4. The caller writes to a work path next to the output; on success the files are
   flushed to disk, given the umask's normal modes, and swapped in with renames
   recorded so that every interruption is repaired by the next run.

Sibling names (``.NAME.dynoswap-new``, ``-old``, ``-ready``, ``-lock``) are fixed, so a
killed run's leftovers are found and cleaned by the next one.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import OutputExistsError, OutputLockedError


@dataclass(frozen=True)
class OutputKind:
    """A kind of output dynoswap writes.

    Attributes:
        name: Short name, e.g. ``"saved model"``.
        detect: Whether an existing path is an output of this kind (and nothing else).
    """

    name: str
    detect: Callable[[Path], bool]


_KINDS: dict[str, OutputKind] = {}


def register_output_kind(name: str, detect: Callable[[Path], bool]) -> OutputKind:
    """Register a kind of output that ``--force`` may replace; replacing an existing name warns."""
    if name in _KINDS:
        warnings.warn(f"dynoswap output kinds: replacing {name!r}", stacklevel=2)
    kind = OutputKind(name, detect)
    _KINDS[name] = kind
    return kind


def get_output_kind(name: str) -> OutputKind:
    """Return the kind registered as ``name``."""
    if name not in _KINDS:
        raise KeyError(f"unknown output kind {name!r}; known: {', '.join(sorted(_KINDS))}")
    return _KINDS[name]


def folder_of_only(names: set[str], required: str) -> Callable[[Path], bool]:
    """Return a detector: a folder holding ``required`` and no entry outside ``names``."""

    def detect(path: Path) -> bool:
        if path.is_symlink() or not path.is_dir():
            return False
        entries = {p.name for p in path.iterdir()}
        return required in entries and entries <= names

    return detect


# -- sibling names --------------------------------------------------------------------
def _sibling(path: Path, tag: str) -> Path:
    return path.parent / f".{path.name}.dynoswap-{tag}"


def work_path(path: Path) -> Path:
    """Where the new output is written before it is swapped in."""
    return _sibling(path, "new")


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif _exists(path):
        path.unlink()


def describe(path: Path) -> str:
    """Say in a few words what is at ``path``."""
    if path.is_symlink():
        return f"a symbolic link to {os.readlink(path)}"
    if path.is_dir():
        entries = sorted(p.name for p in path.iterdir())
        if not entries:
            return "an empty folder"
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        return f"a folder with {len(entries)} entr{'y' if len(entries) == 1 else 'ies'} ({shown})"
    if path.is_file():
        return f"a file of {path.stat().st_size} bytes"
    return "something that is neither a file nor a folder"


# -- the lock -------------------------------------------------------------------------
@contextlib.contextmanager
def output_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path``'s sibling lock file; another holder fails at once.

    The lock file is removed on release; a holder checks that the file it locked is
    still the one at the path, so a removal never lets two writers in.
    """
    import fcntl

    lock = _sibling(path, "lock")
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise OutputLockedError(
                    f"{path} is being written by another process; wait for it or choose another path"
                ) from None
            raise
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the previous holder removed the file we opened: lock the new one
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)
        os.close(fd)


# -- repair -----------------------------------------------------------------------------
def repair(path: Path) -> str | None:
    """Finish or roll back a swap that a killed writer left; remove its partial work.

    Call with the lock held. Returns what was done, or None when nothing was pending.
    """
    new, old, ready = work_path(path), _sibling(path, "old"), _sibling(path, "ready")
    done = None
    if _exists(old) and not _exists(path):
        if _exists(ready) and _exists(new):
            os.replace(new, path)
            done = f"finished an interrupted replacement of {path}"
        else:
            os.replace(old, path)
            done = f"rolled back an interrupted replacement of {path}"
    if _exists(old):
        _remove(old)
        done = done or f"removed the previous output of {path} left by an interrupted replacement"
    if _exists(new):
        _remove(new)
        done = done or f"removed unfinished output left by an interrupted write of {path}"
    if _exists(ready):
        ready.unlink()
    if done:
        warnings.warn(f"dynoswap: {done}", stacklevel=3)
    return done


def pending_repair(path: Path) -> bool:
    """Whether a killed writer left work for :func:`repair` at ``path``."""
    # A lock file alone is what a kill after the swap leaves: taking and releasing the lock removes it.
    return any(_exists(_sibling(path, tag)) for tag in ("new", "old", "ready", "lock"))


def repair_if_needed(path: str | os.PathLike[str]) -> str | None:
    """Repair ``path`` when a killed writer left it incomplete (takes the lock; a busy path is left alone)."""
    target = Path(path)
    if not pending_repair(target) or not target.parent.is_dir():
        return None
    try:
        with output_lock(target):
            return repair(target)
    except OutputLockedError:
        return None


# -- checks -----------------------------------------------------------------------------
def check_output(path: str | os.PathLike[str], kind: str, force: bool = False) -> Path:
    """Refuse an output path that may not be written: occupied without ``force``, or by something else.

    Raises:
        OutputExistsError: Something is at ``path`` and ``force`` is False, or it is not a ``kind`` output.
    """
    target = Path(path)
    if not _exists(target):
        return target
    detected = get_output_kind(kind).detect(target)
    if not detected:
        raise OutputExistsError(f"{target} holds {describe(target)}, not a dynoswap {kind}; refusing to replace it")
    if not force:
        raise OutputExistsError(f"{target} already holds a dynoswap {kind}", replaceable=True)
    return target


# -- writing ----------------------------------------------------------------------------
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def settle(root: Path) -> None:
    """Give every file the umask's normal mode and flush it to disk, then the folders."""
    mask = _umask()
    paths = [root] if root.is_file() else [root, *sorted(root.rglob("*"))]
    for p in paths:
        if p.is_symlink():
            continue
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(root.parent)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # some filesystems do not sync folders
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


#: Hook called between the filesystem steps of a replacement (tests inject failures here).
STEP_HOOK: Callable[[str], None] | None = None


def _step(name: str) -> None:
    if STEP_HOOK is not None:
        STEP_HOOK(name)


def commit(path: Path) -> None:
    """Swap the finished work path in for ``path`` (with the lock held)."""
    new, old, ready = work_path(path), _sibling(path, "old"), _sibling(path, "ready")
    settle(new)
    _step("written")
    ready.touch()
    _fsync_dir(path.parent)
    _step("ready")
    if _exists(path):
        os.replace(path, old)
        _step("moved-old")
    os.replace(new, path)
    _fsync_dir(path.parent)
    _step("moved-new")
    ready.unlink()
    if _exists(old):
        _remove(old)
    _step("cleaned")


@contextlib.contextmanager
def replace_output(path: str | os.PathLike[str], kind: str, force: bool = False) -> Iterator[Path]:
    """Write an output crash-safely: lock, repair, check, write to a work path, swap in.

    Args:
        path: The final file or folder.
        kind: Registered output kind that ``force`` may replace (see :func:`register_output_kind`).
        force: Replace an existing output of the same kind.

    Yields:
        The work path to write (it does not exist yet; create a file or a folder there).

    Raises:
        OutputLockedError: Another process is writing ``path``.
        OutputExistsError: ``path`` is occupied and may not be replaced.
    """
    target = Path(path)
    blocker = next((p for p in target.parents if _exists(p)), None)
    if blocker is not None and not blocker.is_dir():
        raise OutputExistsError(f"cannot write {target}: {blocker} is {describe(blocker)}, not a folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    with output_lock(target):
        repair(target)
        check_output(target, kind, force)
        new = work_path(target)
        try:
            yield new
            if not _exists(new):
                raise OutputExistsError(f"nothing was written for {target}")
            commit(target)
        except BaseException:
            # A failed write leaves the old output as it was; an interrupted swap is finished or rolled back.
            if _exists(_sibling(target, "ready")):
                repair(target)
            elif _exists(new):
                _remove(new)
            raise
