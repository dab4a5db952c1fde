"""Writing results without ever losing a user's files.

Three rules, shared by the runner (a whole ``output_dir``) and ``save_quantized`` (one
checkpoint directory):

1. **Only archquant's own directories are replaced.** Every directory archquant publishes
   holds a marker file (``.archquant``) listing the entries archquant wrote. A target that
   exists, is not empty and has no marker is refused before any work starts
   (``OutputExistsError``). Entries that someone added to an archquant directory later are
   never deleted: they are moved aside, with the directory, under a visible name.
2. **Results appear in one step.** Everything is built in a hidden staging directory next to
   the target (same filesystem) and published by one ``rename``. An existing result is
   swapped out with ``renameat2(RENAME_EXCHANGE)``, so there is no moment without a result
   at the target; where the kernel or filesystem lacks it we fall back to two renames.
   An interrupted or failed run leaves only hidden staging directories, which the next run
   removes (and says so).
3. **Temporary files never follow a planted symlink.** Files are created with
   ``tempfile.mkstemp`` (``O_CREAT | O_EXCL``) in the target's directory and renamed over the
   target, which replaces a symlink rather than writing through it.
"""
from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

MARKER = ".archquant"
_STAGING = "staging"  # marker kind of a directory that is entirely archquant's, being built


class OutputExistsError(ValueError):
    """The target holds files archquant did not write, so it will not replace them."""


# ---------------------------------------------------------------------------------- files
def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a unique temporary file in the same directory."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes it 0600; a result file gets the usual mode
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # replaces a symlink at ``path``; never writes through it
    except BaseException:
        _unlink_quietly(tmp)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _unlink_quietly(path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# ---------------------------------------------------------------------------------- markers
def read_marker(directory: Path) -> dict | None:
    """The marker of an archquant directory, or None (absent, a symlink, or not ours)."""
    marker = Path(directory) / MARKER
    if marker.is_symlink() or not marker.is_file():
        return None
    try:
        data = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("written_by") == "archquant" else None


def write_marker(directory: Path, kind: str, entries: list[str] | None = None) -> None:
    write_json_atomic(Path(directory) / MARKER, {"written_by": "archquant", "kind": kind,
                                                 "entries": sorted(entries or [])})


def _is_ours(directory: Path, legacy: Callable[[Path], bool] | None) -> bool:
    return read_marker(directory) is not None or (legacy is not None and legacy(directory))


def _foreign_entries(directory: Path, legacy: Callable[[Path], bool] | None) -> list[str]:
    """Entries of an archquant directory that archquant did not write (added by someone else)."""
    marker = read_marker(directory)
    if marker is None:
        return [] if legacy is not None and legacy(directory) else sorted(os.listdir(directory))
    if marker.get("kind") == _STAGING:
        return []
    ours = set(marker.get("entries") or []) | {MARKER}
    return sorted(set(os.listdir(directory)) - ours)


def discard_ours(directory: Path, legacy: Callable[[Path], bool] | None = None,
                 aside: Path | None = None) -> Path | None:
    """Delete what archquant wrote in ``directory``; if anything else is left there, rename the
    directory to ``aside`` (a visible name) and return that path, else remove it."""
    directory = Path(directory)
    if not _remove_ours(directory, legacy):
        directory.rmdir()
        return None
    aside = aside or unique_aside_name(directory)
    os.replace(directory, aside)
    return aside


def _remove_ours(directory: Path, legacy: Callable[[Path], bool] | None) -> bool:
    """Remove archquant's entries of ``directory`` (recursing into marked subdirectories, such as
    a checkpoint inside an output_dir); True if someone else's files remain."""
    foreign = set(_foreign_entries(directory, legacy))
    for name in os.listdir(directory):
        if name in foreign:
            continue
        p = directory / name
        if p.is_dir() and not p.is_symlink():
            if read_marker(p) is not None and _remove_ours(p, None):
                foreign.add(name)  # it keeps someone's files: leave it, with them, in place
            else:
                shutil.rmtree(p)
        else:
            p.unlink()
    return bool(foreign)


def unique_aside_name(target: Path) -> Path:
    """A visible, unused sibling name for keeping what someone added to an old result."""
    target = Path(target)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = target.name.lstrip(".") or "output"
    candidate, n = target.with_name(f"{name}.kept-{stamp}"), 1
    while candidate.exists() or candidate.is_symlink():
        candidate, n = target.with_name(f"{name}.kept-{stamp}-{n}"), n + 1
    return candidate


# ---------------------------------------------------------------------------------- renames
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------------------------- staging
def _leftover_pattern(target_name: str) -> re.Pattern:
    # staging dirs are ".{name}.tmp-{pid}-{random}"; a failed swap can leave ".{name}.old-{pid}-{random}";
    # archquant before the marker file wrote ".{name}.tmp-{random}" and ".{name}.old-{pid}"
    return re.compile(rf"^\.{re.escape(target_name)}\.(tmp|old)-(?:(\d+)-)?[^/]*$")


class StagedDir:
    """Build a directory's new contents in hidden staging and publish them in one step.

        with StagedDir(out) as stage:        # checks the target and cleans old leftovers now
            ...write into stage.path...
            stage.publish()                  # marker last, then one rename (or an exchange)

    Leaving the block without ``publish`` (an error, Ctrl-C) removes the staging directory and
    leaves the target as it was. ``legacy(path)`` recognises directories written by an archquant
    that predates the marker file.
    """

    def __init__(self, target: str | os.PathLike, *, legacy: Callable[[Path], bool] | None = None,
                 what: str = "output directory") -> None:
        self.target = Path(os.path.abspath(target))
        self.legacy = legacy
        self.what = what
        self.path: Path | None = None
        self.swept: list[str] = []        # leftovers of interrupted runs removed
        self.kept: list[str] = []         # leftovers that held someone else's files, renamed visibly
        self.moved_aside: Path | None = None
        self.published = False

    # -- before any work
    def __enter__(self) -> "StagedDir":
        self.check_target()
        try:  # creating the staging directory is the writability check, before any work
            self.target.parent.mkdir(parents=True, exist_ok=True)
            self._sweep_leftovers()
            self.path = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.tmp-{os.getpid()}-",
                                              dir=self.target.parent))
        except OSError as e:
            raise OSError(f"cannot write {self.what} {self.target}: {e.strerror or e}") from None
        os.chmod(self.path, 0o777 & ~_umask())  # mkdtemp makes it 0700; a published result gets the usual mode
        write_marker(self.path, _STAGING)
        return self

    def check_target(self) -> None:
        """Refuse a target that is a file, or a non-empty directory archquant did not write."""
        t = self.target
        if t.is_symlink() or (t.exists() and not t.is_dir()):
            raise OutputExistsError(f"{self.what} {t} exists and is not a directory: choose another path")
        if t.is_dir() and os.listdir(t) and not _is_ours(t, self.legacy):
            example = sorted(os.listdir(t))[0]
            raise OutputExistsError(f"{self.what} {t} already holds files archquant did not write "
                                    f"(e.g. {example}); it will not replace them: choose a new or empty directory")

    def _sweep_leftovers(self) -> None:
        pattern = _leftover_pattern(self.target.name)
        for entry in sorted(os.listdir(self.target.parent)):
            match = pattern.match(entry)
            path = self.target.parent / entry
            if not match or path.is_symlink() or not path.is_dir():
                continue
            if match.group(2) and _pid_alive(int(match.group(2))):
                continue  # a run still in progress (or this one)
            if os.listdir(path) and not _is_ours(path, self.legacy):
                continue  # not recognisably ours: leave it alone
            kept = discard_ours(path, self.legacy, aside=unique_aside_name(self.target))
            (self.kept if kept else self.swept).append(str(kept or path))

    def foreign_in_target(self) -> list[str]:
        """What someone else added to the current (archquant-written) target; it will be kept aside."""
        return _foreign_entries(self.target, self.legacy) if self.target.is_dir() else []

    def planned_aside(self) -> Path | None:
        """Where the target's foreign entries will go on publish (so the report can say it)."""
        if self.moved_aside is None and self.foreign_in_target():
            self.moved_aside = unique_aside_name(self.target)
        return self.moved_aside

    # -- the one step
    def publish(self) -> Path:
        """Write the marker (listing what is ours), then put the staging directory at the target."""
        assert self.path is not None and not self.published
        write_marker(self.path, "result", [e for e in os.listdir(self.path) if e != MARKER])
        self.check_target()  # the target may have changed while we worked
        t = self.target
        old = None
        if not t.exists():
            os.rename(self.path, t)
        elif not os.listdir(t):
            os.replace(self.path, t)  # rename onto an empty directory is atomic
        elif _exchange(self.path, t):
            old = self.path  # the previous result now sits at the hidden staging name
        else:  # no exchange on this system: two renames, with a brief moment without a result
            old = t.with_name(f".{t.name}.old-{os.getpid()}-{os.urandom(4).hex()}")
            os.rename(t, old)
            os.rename(self.path, t)
        # From here on the result is in place: nothing below may remove the staging path any more,
        # since it may hold the previous result (with files someone added to it).
        self.published = True
        _fsync_dir(t.parent)
        if old is not None:
            self.moved_aside = discard_ours(old, self.legacy, aside=self.planned_aside() or unique_aside_name(t))
        return t

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.published and self.path is not None and self.path.exists():
            shutil.rmtree(self.path, ignore_errors=True)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
