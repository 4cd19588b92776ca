"""All-or-nothing folders: a set of files is written beside the target and swapped in as a whole.

Each file of a set being atomic is not enough: a crash between two files leaves a folder whose
files belong to different saves (new weights, old config). :func:`atomic_folder` writes every file
into ``<target>.tmp-<pid>-XXXX`` beside the target, fsyncs it, then swaps it in: the old folder is
renamed to ``<target>.old-<ns>-<pid>``, the new one renamed to ``<target>``, the old one removed.
A folder cannot be replaced by a single rename on POSIX, so a crash between the two renames
leaves no ``<target>`` but a complete ``.old`` version: :func:`resolve_folder` finds it (loaders
call it), and the next write cleans it up.

Entries of the old folder that the writer does not own (say a nested ``peft/`` export, or a
user's notes) are carried into the new folder as hard links (copies where links fail), so
replacing an adapter never deletes anything else; orphan temporary files of killed writers are not.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_folder", "resolve_folder"]

log = logging.getLogger(__name__)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot fsync folders
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _leftovers(target: Path, kind: str) -> list[Path]:
    prefix = f"{target.name}.{kind}-"
    if not target.parent.is_dir():
        return []
    return sorted(p for p in target.parent.iterdir() if p.name.startswith(prefix) and p.is_dir())


def _remove_dead_temps(target: Path) -> None:
    """Temporary folders of writers that were killed (their pid is gone)."""
    for tmp in _leftovers(target, "tmp"):
        pid = tmp.name[len(target.name) + len(".tmp-") :].split("-")[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def resolve_folder(target: str | os.PathLike) -> Path:
    """``target``, or when a save was killed between its two renames, the complete previous version it left.

    Returns ``target`` itself when it exists or nothing was left behind (the caller reports it missing).
    """
    target = Path(target)
    if target.exists():
        return target
    olds = _leftovers(target, "old")
    if not olds:
        return target
    log.warning("%s is missing: a save into it was interrupted; reading the previous version from %s "
                "(the next save to %s cleans this up)", target, olds[-1], target)
    return olds[-1]


def _carry_over(old: Path, new: Path, owned: Collection[str]) -> None:
    """Hard-link (or copy) into ``new`` every entry of ``old`` that the writer neither wrote nor owns."""
    for entry in old.iterdir():
        if entry.name in owned or (new / entry.name).exists() or _orphan_temp(entry.name):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, new / entry.name, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(str(entry), str(new / entry.name))


def _orphan_temp(name: str) -> bool:
    """A temporary file a killed single-file writer left (``.<name>.<random>.tmp``, see ``atomic_write_bytes``)."""
    return name.startswith(".") and name.endswith(".tmp")


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


@contextmanager
def atomic_folder(target: str | os.PathLike, owned: Collection[str] = ()) -> Iterator[Path]:
    """Write a folder's files all or nothing: yields an empty folder to fill; on success it becomes ``target``.

    ``owned`` names the entries the writer is responsible for: in an existing ``target`` they are
    dropped when the new set does not write them (no stale file of an older save survives); other
    entries are carried over. On an exception the temporary folder is removed and ``target`` is
    left as it was.

    Example:
        >>> import tempfile, pathlib
        >>> root = pathlib.Path(tempfile.mkdtemp())
        >>> with atomic_folder(root / "out") as tmp:
        ...     _ = (tmp / "a.txt").write_text("new")
        >>> (root / "out" / "a.txt").read_text()
        'new'
    """
    target = Path(os.path.abspath(target))
    if target == Path.cwd() or target in Path.cwd().parents:
        raise ValueError(f"{target} is the working directory or holds it; a folder written all or nothing is replaced as a "
                         f"whole, so give the adapter a folder of its own (e.g. {target / 'adapter'})")
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{target} is a file; adapters are saved into a folder (give a folder path)")
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_temps(target)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f"{target.name}.tmp-{os.getpid()}-"))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private (0700); the saved folder gets the mode of a mkdir
        yield tmp
        previous = resolve_folder(target)
        if previous.exists():
            _carry_over(previous, tmp, owned)
        for entry in tmp.iterdir():
            if entry.is_file() and not entry.is_symlink():
                with open(entry, "rb") as f:
                    os.fsync(f.fileno())
        _fsync(tmp)
        if target.exists():
            aside = target.with_name(f"{target.name}.old-{time.time_ns()}-{os.getpid()}")
            os.rename(target, aside)
        os.rename(tmp, target)
        _fsync(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in _leftovers(target, "old"):
        shutil.rmtree(old, ignore_errors=True)
