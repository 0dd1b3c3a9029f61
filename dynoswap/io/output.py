"""Outputs that never destroy data: locked, crash-safe replacement of a file or folder.

``replace_output(path, kind, force)`` is the one way dynoswap writes an output:

1. It takes an exclusive lock on a sibling lock file (``fcntl.flock``), opened with
   ``O_NOFOLLOW``: a second writer to the same path fails at once with
   :class:`~dynoswap.errors.OutputLockedError`, and a link planted at the lock's name
   is refused, never followed.
2. It repairs what a killed writer left (:func:`repair`): a swap that was recorded as
   ready is finished, other partial work removed. Only private work folders that
   dynoswap made (``mkdtemp``) are touched, and only entries whose inode the record
   names are renamed.
3. An existing output is replaced only with ``force`` and only if its content proves
   it is a dynoswap output of the same ``kind`` (a saved model whose recipe parses, a
   plot carrying dynoswap's mark, ...); anything else is refused with a line saying
   what is there.
4. The caller writes to a work path inside a private folder made with ``mkdtemp`` next
   to the output; on success the files are flushed to disk, given the umask's normal
   modes, and swapped in with renames recorded so that every interruption is repaired
   by the next run.

Sibling names start with ``.NAME.`` (``NAME`` shortened with a hash when the full name
would pass the 255-byte limit), so a killed run's leftovers are found and cleaned by
the next one.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import stat
import tempfile
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
#: Longest file name most filesystems take, in bytes.
NAME_MAX = 255
#: Room kept for the longest tag and mkdtemp's suffix.
_TAG_ROOM = 40


def sibling_stem(name: str) -> str:
    """Return the part of dynoswap's sibling names that stands for the output ``name``.

    The name itself when ``.NAME.dynoswap-TAG`` fits in :data:`NAME_MAX` bytes; otherwise
    its start and a hash of the whole, so a name near the limit still gets short siblings.
    """
    raw = name.encode("utf-8", "surrogateescape")
    if len(raw) + _TAG_ROOM <= NAME_MAX:
        return name
    digest = hashlib.sha256(raw).hexdigest()[:16]
    return raw[:64].decode("utf-8", "ignore") + "~" + digest


def _sibling(path: Path, tag: str) -> Path:
    return path.parent / f".{sibling_stem(path.name)}.dynoswap-{tag}"


def _work_prefix(path: Path) -> str:
    return f".{sibling_stem(path.name)}.dynoswap-work-"


#: Name of the output inside a private work folder, of what it replaces, and of the swap record.
_NEW, _OLD, _RECORD = "new", "old", "record.json"


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif _exists(path):
        path.unlink()


def _identity(path: Path) -> list[int]:
    st = path.lstat()
    return [st.st_dev, st.st_ino]


def _is_recorded(entry: Path, record: dict[str, list[int]] | None, key: str) -> bool:
    """Whether ``entry`` is what the swap record names (same device and inode) and not a link."""
    return record is not None and _exists(entry) and not entry.is_symlink() and _identity(entry) == record.get(key)


def open_private(path: Path, flags: int = os.O_WRONLY, mode: int = 0o600) -> int:
    """Create ``path`` and open it, never through a link: ``O_CREAT | O_EXCL | O_NOFOLLOW``.

    Raises:
        FileExistsError: Something (a file, a planted link) is already at ``path``.
    """
    return os.open(path, flags | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)


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
def lock_path(path: Path) -> Path:
    """Return the sibling file whose lock guards writes to ``path``."""
    return _sibling(path, "lock")


def _open_lock(lock: Path, target: Path) -> int:
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OutputExistsError(
                f"{lock} is a symbolic link, not dynoswap's lock file for {target}; refusing to follow it"
            ) from exc
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OutputExistsError(f"{lock} is not dynoswap's lock file for {target} (not a plain file)")
    return fd


@contextlib.contextmanager
def output_lock(path: Path, *, busy: str = "is being written by another process") -> Iterator[None]:
    """Hold an exclusive lock on ``path``'s sibling lock file; another holder fails at once.

    The lock file is opened with ``O_NOFOLLOW`` (a planted link is refused) and removed on
    release; a holder checks that the file it locked is still the one at the path, so a
    removal never lets two writers in.

    Args:
        path: The output (or run folder) the lock guards.
        busy: What the refusal says about ``path`` when another process holds the lock.
    """
    import fcntl

    lock = lock_path(path)
    while True:
        fd = _open_lock(lock, path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise OutputLockedError(f"{path} {busy}; wait for it or choose another path") from exc
            raise
        try:
            same = os.path.samestat(os.fstat(fd), os.lstat(lock))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the previous holder removed the file we opened: lock the new one
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            if os.path.samestat(os.fstat(fd), os.lstat(lock)):
                os.unlink(lock)
        os.close(fd)


# -- repair -----------------------------------------------------------------------------
def _notice(text: str) -> None:
    """Tell the user what a repair did: a warning attributed to this module (the CLI prints it as one line)."""
    warnings.warn_explicit(f"dynoswap: {text}", UserWarning, __file__, 0, module=__name__)


def _work_folders(path: Path) -> list[Path]:
    """Return the private work folders a writer of ``path`` made: real folders of ours with the work prefix."""
    prefix = _work_prefix(path)
    found = []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return []
    for entry in entries:
        if not entry.name.startswith(prefix):
            continue
        st = entry.stat(follow_symlinks=False)
        # mkdtemp makes a folder of ours that only we may enter: anything else was not made by a writer.
        if stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o077:
            found.append(Path(entry.path))
    return sorted(found)


def _recorded(work: Path) -> dict[str, list[int]] | None:
    """Return the swap record of a work folder, or None when there is none (or it is not ours)."""
    record = work / _RECORD
    try:
        if not stat.S_ISREG(record.lstat().st_mode) or record.lstat().st_size > 4096:
            return None
        data = json.loads(record.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def repair(path: Path) -> str | None:
    """Finish a swap that a killed writer recorded as ready; remove its partial work.

    Call with the lock held. Only folders made by a writer's ``mkdtemp`` are touched, and
    only the entry whose device and inode the swap record names is renamed into ``path``:
    nothing planted at dynoswap's names is ever moved. Returns what was done, or None.
    """
    done = None
    for work in _work_folders(path):
        record = _recorded(work)
        new, old = work / _NEW, work / _OLD
        if not _exists(path) and _is_recorded(new, record, _NEW):
            os.replace(new, path)
            _fsync_dir(path.parent)
            done = f"finished an interrupted replacement of {path}"
        elif not _exists(path) and _is_recorded(old, record, _OLD):
            os.replace(old, path)  # no new output to finish with: put the old one back
            _fsync_dir(path.parent)
            done = f"rolled back an interrupted replacement of {path}"
        elif done is None:
            had_old = _exists(old)
            done = (
                f"removed the previous output of {path} left by an interrupted replacement"
                if had_old
                else f"removed unfinished output left by an interrupted write of {path}"
            )
        shutil.rmtree(work)
    if done:
        _notice(done)
    return done


def pending_repair(path: Path) -> bool:
    """Whether a killed writer left work for :func:`repair` at ``path``.

    A lock file alone is what a kill after the swap leaves: taking and releasing the lock removes it.
    """
    return _exists(lock_path(path)) or bool(_work_folders(path))


def repair_if_needed(path: str | os.PathLike[str]) -> str | None:
    """Repair ``path`` when a killed writer left it incomplete; a reader's call.

    Takes the lock; a busy path, a planted lock name or a folder that cannot be written
    (read-only media) is left as it is: reading never needs a write.
    """
    target = Path(path)
    if not target.parent.is_dir() or not pending_repair(target):
        return None
    try:
        with output_lock(target):
            return repair(target)
    except (OutputExistsError, OSError):
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


def _write_record(work: Path, record: dict[str, list[int]]) -> None:
    fd = open_private(work / _RECORD)
    try:
        os.write(fd, json.dumps(record).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    _fsync_dir(work)


def commit(path: Path, work: Path) -> None:
    """Swap the finished ``work/new`` in for ``path`` (with the lock held), then remove ``work``."""
    new, old = work / _NEW, work / _OLD
    settle(new)
    _step("written")
    record = {_NEW: _identity(new)}
    if _exists(path):
        record[_OLD] = _identity(path)
    _write_record(work, record)
    _fsync_dir(path.parent)
    _step("ready")
    if _exists(path):
        os.replace(path, old)
        _step("moved-old")
    os.replace(new, path)
    _fsync_dir(path.parent)
    _step("moved-new")
    shutil.rmtree(work)
    _step("cleaned")


@contextlib.contextmanager
def replace_output(path: str | os.PathLike[str], kind: str, force: bool = False) -> Iterator[Path]:
    """Write an output crash-safely: lock, repair, check, write to a private work path, swap in.

    Args:
        path: The final file or folder.
        kind: Registered output kind that ``force`` may replace (see :func:`register_output_kind`).
        force: Replace an existing output of the same kind.

    Yields:
        The work path to write (it does not exist yet; create a file or a folder there). It
        lies in a folder made with ``mkdtemp`` beside ``path``: nothing else can be there.

    Raises:
        OutputLockedError: Another process is writing ``path``.
        OutputExistsError: ``path`` is occupied and may not be replaced, or a link is planted at the lock's name.
    """
    target = Path(path)
    blocker = next((p for p in target.parents if _exists(p)), None)
    if blocker is not None and not blocker.is_dir():
        raise OutputExistsError(f"cannot write {target}: {blocker} is {describe(blocker)}, not a folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    with output_lock(target):
        repair(target)
        check_output(target, kind, force)
        work = Path(tempfile.mkdtemp(prefix=_work_prefix(target), dir=target.parent))
        try:
            yield work / _NEW
            if not _exists(work / _NEW):
                raise OutputExistsError(f"nothing was written for {target}")
            commit(target, work)
        except BaseException:
            # A failed write leaves the old output as it was; an interrupted swap is finished or rolled back.
            if _exists(work):
                if _recorded(work) is not None:
                    repair(target)
                else:
                    shutil.rmtree(work)
            raise
