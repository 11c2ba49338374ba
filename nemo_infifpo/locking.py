"""Exclusive locks on output directories, safe on shared filesystems and after a killed holder.

Two jobs writing the same output (a second ``sbatch`` of the same training, an array task
submitted twice) corrupt each other: checkpoints pruned under the other run, a vanished
temporary directory, interleaved metrics. Every stage that writes holds an :class:`OutputLock`
on what it writes; a second run is refused with a message naming the holder.

The lock is a small JSON file created with ``link(2)`` of a complete temporary file (atomic on
local filesystems, NFS and Lustre, and never seen half-written). Its holder refreshes its mtime
(a heartbeat thread). A lock whose holder is gone is taken over, with a warning, when:

- the holder ran on this host and its process no longer exists (or the PID was reused);
- the holder was an earlier run of this same Slurm job (a requeue: same ``SLURM_JOB_ID``,
  lower ``SLURM_RESTART_COUNT``);
- its heartbeat is older than ``NEMO_INFIFPO_LOCK_STALE_S`` seconds (default 600): a holder
  on another node that was killed with its node.

Only the process that created a lock (recognised by a random token) removes it.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from nemo_infifpo.data.errors import InputError

__all__ = ["LockHolder", "OutputLock", "OutputLockedError", "lock_on_rank0", "sibling_lock_path"]

log = logging.getLogger(__name__)

STALE_AFTER_ENV = "NEMO_INFIFPO_LOCK_STALE_S"
DEFAULT_STALE_AFTER_S = 600.0


class OutputLockedError(InputError):
    """Another run holds the lock on this output (its message names the holder: reported as
    one line, without a traceback, like other problems a user has to resolve)."""


def _process_start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (field 22 of /proc/PID/stat): tells a reused PID apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    return stat.rsplit(")", 1)[-1].split()[19]


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


@dataclass(frozen=True)
class LockHolder:
    """Who holds a lock: written into the lock file, shown to whoever is refused."""

    token: str
    stage: str
    host: str
    pid: int
    pid_start: str | None
    slurm_job_id: str | None
    slurm_restart_count: int
    started: float

    @classmethod
    def me(cls, stage: str) -> "LockHolder":
        return cls(
            token=uuid.uuid4().hex,
            stage=stage,
            host=socket.gethostname(),
            pid=os.getpid(),
            pid_start=_process_start_time(os.getpid()),
            slurm_job_id=os.environ.get("SLURM_JOB_ID"),
            slurm_restart_count=int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
            started=time.time(),
        )

    def describe(self) -> str:
        job = f", Slurm job {self.slurm_job_id}" if self.slurm_job_id else ""
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"{self.stage} run of process {self.pid} on {self.host}{job}, started {since}"


class OutputLock:
    """An exclusive lock held through the lock file ``path``. Use as a context manager, or call
    :meth:`acquire` and :meth:`release`."""

    def __init__(
        self, path: str | Path, *, stage: str, output: str | Path | None = None, stale_after_s: float | None = None
    ) -> None:
        self.path = Path(path)
        self.stage = stage
        # What the lock protects, for messages: the lock file's directory unless named.
        self.output = Path(output) if output is not None else self.path.parent
        if stale_after_s is None:
            stale_after_s = float(os.environ.get(STALE_AFTER_ENV, DEFAULT_STALE_AFTER_S))
        self.stale_after_s = stale_after_s
        self.heartbeat_s = max(0.05, min(30.0, stale_after_s / 4))
        self.holder: LockHolder | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ public

    def acquire(self, *, wait_s: float = 0.0) -> "OutputLock":
        """Take the lock, waiting up to ``wait_s`` seconds for a live holder to finish.

        Raises :class:`OutputLockedError` naming the holder when it stays held.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = LockHolder.me(self.stage)
        deadline = time.monotonic() + wait_s
        while True:
            if self._create(me):
                self.holder = me
                self._start_heartbeat()
                return self
            other = self._read()
            if other is None:  # released (or being broken) meanwhile: try again at once
                continue
            reason = self._stale_reason(other)
            if reason is not None:
                if self._break(other):
                    log.warning("%s: took over the lock of the %s (%s)", self.path, other.describe(), reason)
                continue
            if time.monotonic() >= deadline:
                raise OutputLockedError(
                    f"{self.output} is in use by the {other.describe()} (lock file {self.path}). "
                    "Wait for it to finish or stop it; two runs writing the same output corrupt each "
                    "other. If that run is certainly dead (e.g. its node crashed), delete the lock "
                    f"file; it is also taken over by itself once its heartbeat is older than "
                    f"{self.stale_after_s:g} s ({STALE_AFTER_ENV})."
                )
            time.sleep(min(0.2, max(0.01, deadline - time.monotonic())))

    def release(self) -> None:
        """Remove the lock file if it is still ours (a taken-over lock is left to its new holder)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.holder is None:
            return
        current = self._read()
        if current is not None and current.token == self.holder.token:
            self.path.unlink(missing_ok=True)
        self.holder = None

    @property
    def held(self) -> bool:
        current = self._read() if self.holder is not None else None
        return current is not None and self.holder is not None and current.token == self.holder.token

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()

    # ------------------------------------------------------------------ internals

    def _create(self, me: LockHolder) -> bool:
        tmp = self.path.with_name(f".{self.path.name}.{me.token}.tmp")
        tmp.write_text(json.dumps(asdict(me), sort_keys=True) + "\n", encoding="utf-8")
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        except OSError as error:
            # NFS can report a failed link that did succeed: the link count tells the truth.
            if error.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                return os.stat(tmp).st_nlink == 2
            return self._create_exclusive(me)  # a filesystem without hard links
        finally:
            tmp.unlink(missing_ok=True)

    def _create_exclusive(self, me: LockHolder) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(asdict(me), sort_keys=True) + "\n")
        return True

    def _read(self) -> LockHolder | None:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        try:
            return LockHolder(**json.loads(text))
        except (ValueError, TypeError):
            # Being written without link(2) support, or damaged: held by someone unknown.
            return LockHolder("?", "unknown", "unknown host", -1, None, None, 0, self._mtime() or time.time())

    def _mtime(self) -> float | None:
        try:
            return self.path.stat().st_mtime
        except FileNotFoundError:
            return None

    def _stale_reason(self, other: LockHolder) -> str | None:
        me = LockHolder.me(self.stage)
        if other.host == me.host and other.pid > 0:
            if not _process_alive(other.pid):
                return f"process {other.pid} no longer exists"
            start = _process_start_time(other.pid)
            if other.pid_start is not None and start is not None and start != other.pid_start:
                return f"process id {other.pid} now belongs to another process"
        if other.slurm_job_id and other.slurm_job_id == me.slurm_job_id and other.slurm_restart_count < me.slurm_restart_count:
            return f"an earlier run of this requeued Slurm job {me.slurm_job_id}"
        mtime = self._mtime()
        if mtime is not None and time.time() - mtime > self.stale_after_s:
            return f"no heartbeat for {time.time() - mtime:.0f} s"
        return None

    def _break(self, stale: LockHolder) -> bool:
        """Move a stale lock aside; True if it was the one judged stale (not a fresh one)."""
        aside = self.path.with_name(f".{self.path.name}.stale.{uuid.uuid4().hex}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        try:
            moved = LockHolder(**json.loads(aside.read_text(encoding="utf-8")))
        except (ValueError, TypeError):
            moved = None
        if moved is not None and moved.token != stale.token:
            # Someone replaced the stale lock with a live one between our read and the rename:
            # put it back (link fails only if a third process has locked meanwhile).
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
            aside.unlink(missing_ok=True)
            return False
        aside.unlink(missing_ok=True)
        return True

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name=f"lock-heartbeat:{self.path}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                os.utime(self.path)
            except FileNotFoundError:
                log.error("%s: the lock file disappeared while this run held it", self.path)
                return


def sibling_lock_path(output: str | Path) -> Path:
    """The lock file of an output that is replaced as a whole (an exported directory, a merged
    file): next to it, so clearing or renaming the output never removes its own lock."""
    output = Path(output).resolve()
    return output.parent / f".{output.name}.lock"


def lock_on_rank0(
    path: str | Path, *, stage: str, output: str | Path | None = None, wait_s: float = 0.0
) -> OutputLock | None:
    """Take ``path`` on global rank 0 of a job; every rank raises the same
    :class:`OutputLockedError` when it is held. Collective when torch.distributed is initialised.
    Returns the lock on rank 0 (release it when done), None elsewhere."""
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    rank = dist.get_rank() if distributed else 0
    lock: OutputLock | None = None
    problem = ""
    if rank == 0:
        try:
            lock = OutputLock(path, stage=stage, output=output).acquire(wait_s=wait_s)
        except OutputLockedError as error:
            problem = str(error)
    if distributed:
        message = [problem]
        dist.broadcast_object_list(message, src=0)
        problem = str(message[0])
    if problem:
        raise OutputLockedError(problem)
    return lock
