"""The output folder of one reproduction: it holds one configuration, and one process writes it at a time.

- **One configuration.** Without --resume, ``--out`` must be new or empty (a lock file left by a stopped run
  aside): a folder that already holds files would mix the old run's results with the new configuration.
- **One writer.** The running process holds ``reproduce.lock`` in the folder: an exclusive ``flock`` on it
  (released by the kernel when the process ends, however it ends) and, in the file, its pid, host and start
  time, so that a second run into the same folder is refused naming the holder. The file is removed at
  exit; one left behind by a killed run is taken over, with a note. Only the driving process locks:
  --jobs workers and torchrun's other ranks write through it (checkpoints) or not at all.
"""

from __future__ import annotations

import datetime
import errno
import json
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: the folder is then not locked (see lock_folder)
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = "reproduce.lock"


class FolderError(SystemExit):
    """--out cannot be used: a one-line message naming the folder and the fix (the command line prints it)."""


@dataclass
class FolderLock:
    """The held lock of one output folder; :meth:`release` removes it (and the folder, if this run created it
    and left it empty)."""

    folder: Path
    fd: int | None
    created: bool

    @property
    def path(self) -> Path:
        return self.folder / LOCK_NAME

    def release(self) -> None:
        if self.fd is None:
            return
        if _same_file(self.path, self.fd):  # (not a file another run made after someone deleted ours)
            self.path.unlink()  # while still holding it: no other process can hold this file now
        os.close(self.fd)
        self.fd = None
        if self.created and self.folder.is_dir() and not any(self.folder.iterdir()):
            self.folder.rmdir()

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _holder_text(path: Path) -> str:
    """Who holds (or held) the lock file, in words, from what it records."""
    try:
        holder = json.loads(path.read_text())
        return f"pid {holder['pid']} on {holder['host']}, started {holder['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not recorded itself yet"


def _same_file(path: Path, fd: int) -> bool:
    """Whether ``path`` still names the file open as ``fd``."""
    try:
        return os.path.samestat(os.stat(path), os.fstat(fd))
    except FileNotFoundError:
        return False


def _open_locked(path: Path) -> int | None:
    """A descriptor of ``path`` (created if absent) holding an exclusive flock, or None while another process
    holds it. Retries when the holder removed the file between our open and our lock (we would lock a file no
    one else can see)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except OSError as err:  # a file system without flock: run unlocked, and say so
            if err.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                os.close(fd)
                raise
            print(f"note: {path.parent}: this file system does not support file locks ({err.strerror}): a second "
                  "run into this folder would not be detected", file=sys.stderr)
            return fd
        if _same_file(path, fd):
            return fd
        os.close(fd)


def _take(path: Path) -> int:
    """Hold the lock file at ``path`` and record this process in it; FolderError naming the holder if held."""
    fd = _open_locked(path)
    if fd is None:
        raise FolderError(f"--out {path.parent} is in use by another run ({_holder_text(path)}): wait for it to "
                          f"finish, or choose another --out")
    if os.fstat(fd).st_size:
        print(f"note: {path.parent}: taking over the lock left by {_holder_text(path)}, which has ended",
              file=sys.stderr)
    me = {"pid": os.getpid(), "host": socket.gethostname(),
          "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
    return fd


def lock_folder(folder: Path) -> FolderLock:
    """Create ``folder`` if needed and hold its lock (see the module docstring); FolderError when the folder
    cannot be created or written, or another run holds it. Without fcntl (not POSIX) nothing is locked."""
    if folder.exists() and not folder.is_dir():
        raise FolderError(f"--out {folder} is a file, not a folder: choose a folder (new or empty)")
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = _take(folder / LOCK_NAME) if fcntl is not None else None
    except OSError as err:
        raise FolderError(f"--out {folder}: cannot create or write this folder ({err.strerror}): choose another "
                          "--out") from None
    return FolderLock(folder, fd, created)


def check_new_run(folder: Path) -> None:
    """Refuse a folder that already holds files (besides its lock) for a run without --resume."""
    held = sorted(p.name for p in folder.iterdir() if p.name != LOCK_NAME)
    if held:
        shown = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
        raise FolderError(f"--out {folder} already holds files ({shown}), and a folder holds one run: continue "
                          "that run with --resume, or choose a new --out")
