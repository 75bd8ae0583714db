"""Write an output file or folder so that a crash at any point leaves the old output or the complete new one.

The new output is written to ``.NAME.tmp-PID`` beside the target. Only when it is complete is an existing folder
renamed aside to ``.NAME.old-PID`` (one atomic rename), the new one renamed into place, and the old one deleted
last; a failing rename puts the old folder back. Files are replaced with a single atomic `os.replace`. Leftovers of
killed runs (their PID no longer alive) are handled on the next call for the same target: a complete old folder
whose replacement never arrived is renamed back into place, temporary outputs are deleted.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path


class OutputError(OSError):
    """The output location cannot be written."""


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def recover_leftovers(target: Path) -> None:
    """Undo what killed runs left beside ``target``: restore an old output that lost its replacement, delete
    temporary outputs."""
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.(tmp|old)-(\d+)$")
    if not target.parent.is_dir():
        return
    for path in sorted(target.parent.iterdir()):
        match = pattern.match(path.name)
        if match is None or _alive(int(match.group(2))):
            continue
        if match.group(1) == "old" and not target.exists():
            os.replace(path, target)  # the crash came between moving the old output aside and the new one in
        else:
            _remove(path)


@contextlib.contextmanager
def atomic_output(target: Path, folder: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; put it in place of ``target`` on success, delete it on failure.

    Raises `OutputError` ("cannot write TARGET: reason") when the location cannot be written, before any work.
    """
    target = Path(target)
    recover_leftovers(target)
    temporary = target.parent / f".{target.name}.tmp-{os.getpid()}"
    try:
        if folder:
            temporary.mkdir()
        else:
            temporary.touch()
    except OSError as error:
        raise OutputError(f"cannot write {target}: {error.strerror or error}") from error
    try:
        yield temporary
        _put_in_place(temporary, target, folder)
    except BaseException:
        _remove(temporary)
        raise


def _put_in_place(temporary: Path, target: Path, folder: bool) -> None:
    backup = target.parent / f".{target.name}.old-{os.getpid()}"
    moved_aside = folder and target.exists()
    if moved_aside:
        os.replace(target, backup)
    try:
        os.replace(temporary, target)
    except BaseException:
        if moved_aside:
            os.replace(backup, target)
        raise
    if moved_aside:
        _remove(backup)  # if this fails half-way, the new output is in place; the rest goes on the next call
