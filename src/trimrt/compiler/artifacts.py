"""Builds on disk: model.onnx + manifest.json (+ model.engine), written atomically.

The build is written into a temporary directory beside the destination and renamed
into place, so a failed compile leaves nothing half-written; an existing build at the
destination is replaced only once the new one is complete.

The destination is checked and the temporary directory created *before* the compile
does any work, so a bad `-o` (not a build, read-only, below a file, holding an input)
fails in a second, not after minutes of export and calibration. An `-o` that is a
symlink is followed: the build replaces what it points to and the link stays a link.
Temporary and backup folders left by a killed compile (their name holds the pid) are
removed by the next compile into the same parent once their process is gone.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import time
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Iterable

from ..errors import BuildError
from ..runtime.manifest import MANIFEST

#: leftovers of a killed compile without a pid in their name (older trimrt) are stale after this
STALE_SECONDS = 600


@contextmanager
def atomic_build_dir(out_dir: str | Path, inputs: Iterable[str | Path] = ()):
    """Check `out_dir`, then yield a fresh temp dir beside it; on success the temp dir
    replaces `out_dir`, on error it is removed (with any parent folders it created).

    `inputs` are files the compile reads: one inside `out_dir` would be deleted by the
    replacement, so that is refused."""
    requested = Path(out_dir)
    out_dir = Path(os.path.realpath(requested))  # a symlinked -o: the build goes where it points
    _check_destination(requested, out_dir)
    for item in inputs:
        path = Path(os.path.realpath(item))
        if path == out_dir or out_dir in path.parents:
            raise BuildError(f"input {item} lies inside the output {requested}, which the build would replace; "
                             "choose another -o path")
    created = _make_parents(requested, out_dir.parent)
    remove_stale_leftovers(out_dir)
    try:
        tmp = _make_temp_dir(out_dir)
    except OSError as exc:
        _remove_created(created)
        raise BuildError(f"cannot write the build {requested}: {exc.strerror} in {out_dir.parent}; "
                         "choose another -o path") from None
    try:
        yield tmp
        _check_destination(requested, out_dir)  # it may have appeared while compiling
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}-{time.time_ns()}"
        if out_dir.exists():
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)  # nothing there when there was no previous build
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_created(created)
        raise


def _check_destination(requested: Path, out_dir: Path) -> None:
    if out_dir.exists() and not (out_dir.is_dir() and ((out_dir / MANIFEST).is_file() or not any(out_dir.iterdir()))):
        where = f"{requested} (a link to {out_dir})" if requested.is_symlink() else str(requested)
        raise BuildError(f"output {where} exists and is not a trimrt build; choose another -o path")


def _make_parents(requested: Path, parent: Path) -> list[Path]:
    """Create the missing folders above the build; the ones created, deepest first."""
    missing = [folder for folder in (parent, *parent.parents) if not folder.exists()]
    folder = missing[-1].parent if missing else parent  # the deepest one that exists
    if not folder.is_dir():
        raise BuildError(f"cannot write the build {requested}: {folder} is a file, not a folder; "
                         "choose another -o path")
    created = []
    for path in reversed(missing):
        try:
            path.mkdir()
        except FileExistsError:
            continue
        except OSError as exc:
            _remove_created(created)
            raise BuildError(f"cannot write the build {requested}: cannot create {path} ({exc.strerror}); "
                             "choose another -o path") from None
        created.insert(0, path)
    return created


def _remove_created(created: list[Path]) -> None:
    for path in created:  # deepest first; only folders still empty
        try:
            path.rmdir()
        except OSError:
            break


def _make_temp_dir(out_dir: Path) -> Path:
    """`.<name>.tmp-<pid>-<random>` beside `out_dir`, made with os.mkdir so it honours the
    umask (tempfile.mkdtemp makes 0700 folders, which would become a private build)."""
    while True:
        tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        with suppress(FileExistsError):
            tmp.mkdir()
            return tmp


_LEFTOVER = re.compile(r"\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<rest>.*)")


def remove_stale_leftovers(out_dir: Path) -> list[Path]:
    """Remove `.<name>.tmp-*` / `.<name>.old-*` folders beside `out_dir` whose compile is
    gone (its pid is dead, or, with no pid in the name, older than STALE_SECONDS). A
    backup (`.old-`) is only removed while `out_dir` itself exists: otherwise it holds the
    previous build, and is left for the user."""
    removed = []
    try:
        entries = list(out_dir.parent.iterdir())
    except OSError:
        return removed
    for path in entries:
        match = _LEFTOVER.fullmatch(path.name)
        if not match or match["name"] != out_dir.name or not path.is_dir() or path.is_symlink():
            continue
        if match["kind"] == "old" and not out_dir.exists():
            continue
        pid = match["rest"].split("-", 1)[0]
        if pid.isdigit():
            stale = not _pid_alive(int(pid))
        else:
            try:
                stale = time.time() - path.stat().st_mtime > STALE_SECONDS
            except OSError:
                continue
        if stale:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        pass  # another user's process (or not a pid we can ask about): leave it
    return True
