"""One run per workdir: an exclusive lock file `<workdir>/lock`.

Two jobs writing one workdir interleave `metrics.jsonl` and race on orbax's
temporary checkpoint folders (one of them can hang). `WorkdirLock` makes the
second job fail at once, naming the holder. The lock is a JSON file
`{host, pid, start_time, command}` created atomically with
`O_CREAT | O_EXCL`, so of two jobs starting together exactly one wins. A lock
whose holder is gone (same host, pid no longer alive, or the pid now belongs
to a younger process) is stale and is taken over with a warning; a lock of
another host is never judged stale, since its pid cannot be checked from here.

Remote paths (`gs://...`, through `etils.epath`) have no exclusive create:
the lock is written, then read back after a short wait, and the run proceeds
only if it still holds its own token. Two jobs starting within that wait on
the same remote workdir can both proceed; the guarantee is weaker there.

Multi-host runs hold the lock once per run: only the lead process (process 0)
acquires it; other processes get a lock object that does nothing.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import sys
import time
import uuid
from typing import Any

from absl import logging

LOCK_NAME = "lock"
# How long a just-created lock may stay empty or partial (its writer is
# between create and write) before it counts as unreadable.
_READ_RETRY_S = 1.0
# Remote write-then-check: wait this long for a concurrent writer to land.
_REMOTE_SETTLE_S = 2.0
# A takeover guard older than this belongs to a process that died mid-takeover.
_GUARD_STALE_S = 30.0


class WorkdirLockedError(RuntimeError):
  """Another run holds the workdir's lock (the message names it)."""


def _process_start_ticks(pid: int) -> int | None:
  """The process's start time in clock ticks since boot (Linux), or None."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      stat = f.read()
  except OSError:
    return None
  # Field 22; the command name (field 2) may hold spaces, so split after it.
  try:
    return int(stat.rsplit(")", 1)[1].split()[19])
  except (IndexError, ValueError):
    return None


def _boot_id() -> str | None:
  try:
    with open("/proc/sys/kernel/random/boot_id") as f:
      return f.read().strip()
  except OSError:
    return None


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # It exists, owned by another user.
  except OSError:
    return False
  return True


def holder_is_stale(holder: dict[str, Any]) -> bool:
  """Whether a lock's holder is gone: same host and its process has ended.

  A pid can be reused after its process ends; the recorded boot id and start
  ticks (Linux) tell a reused pid from the holder itself.
  """
  if holder.get("host") != socket.gethostname():
    return False
  pid = holder.get("pid")
  if not isinstance(pid, int) or pid <= 0:
    return False
  if not _pid_alive(pid):
    return True
  boot = holder.get("boot_id")
  if boot is not None and _boot_id() is not None and boot != _boot_id():
    return True
  ticks = holder.get("start_ticks")
  now_ticks = _process_start_ticks(pid)
  return ticks is not None and now_ticks is not None and ticks != now_ticks


def describe(holder: dict[str, Any] | None) -> str:
  """`pid P on host H, started T (command C)` for messages."""
  if not holder:
    return "an unknown process (the lock file is empty or not JSON)"
  text = (
      f"pid {holder.get('pid')} on host {holder.get('host')}, started "
      f"{holder.get('start_time')}"
  )
  if holder.get("command"):
    text += f" (command: {holder['command']})"
  return text


class WorkdirLock:
  """Exclusive lock on a workdir, as a context manager or acquire/release.

  Example:

    with workdir_lock.WorkdirLock(workdir, is_lead=jax.process_index() == 0):
      ...  # train

  Args:
    workdir: the run directory (str, os.PathLike or `etils.epath.Path`);
      created if missing.
    is_lead: whether this process takes the lock (process 0 of a multi-host
      run); the others hold nothing.
  """

  def __init__(self, workdir: Any, *, is_lead: bool = True):
    self.workdir = workdir
    self.is_lead = is_lead
    self._remote = "://" in os.fspath(workdir) if isinstance(
        workdir, str | os.PathLike) else True
    if self._remote:
      from etils import epath  # Only remote workdirs need it.

      self.path = epath.Path(workdir) / LOCK_NAME
    else:
      self.path = os.path.join(
          os.path.abspath(os.path.expanduser(os.fspath(workdir))), LOCK_NAME
      )
    self.record: dict[str, Any] = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "start_time": datetime.datetime.now().astimezone().isoformat(
            timespec="seconds"
        ),
        "command": " ".join(sys.argv),
        "token": uuid.uuid4().hex,
        "boot_id": _boot_id(),
        "start_ticks": _process_start_ticks(os.getpid()),
    }
    self.held = False

  # ------------------------------------------------------------- public API

  def acquire(self) -> WorkdirLock:
    """Takes the lock; a stale one is taken over with a warning.

    Raises:
      WorkdirLockedError: another live run holds it (one-line message naming
        the holder and the lock file, and what to do).
    """
    if not self.is_lead or self.held:
      return self
    if self._remote:
      self._acquire_remote()
    else:
      os.makedirs(os.path.dirname(self.path), exist_ok=True)
      if not self._create_exclusive():
        holder = self._read_holder()
        if holder is None or not holder_is_stale(holder):
          raise self._locked_error(holder)
        self._take_over(holder)
    self.held = True
    return self

  def release(self) -> None:
    """Removes the lock file if it is still ours (never another run's)."""
    if not self.held:
      return
    self.held = False
    holder = self._read_holder(retry=False)
    if not holder or holder.get("token") != self.record["token"]:
      logging.warning(
          "Workdir lock %s is no longer ours (now held by %s); left as is.",
          self.path, describe(holder),
      )
      return
    try:
      if self._remote:
        self.path.unlink()
      else:
        os.unlink(self.path)
    except FileNotFoundError:
      pass

  def __enter__(self) -> WorkdirLock:
    return self.acquire()

  def __exit__(self, *exc_info: Any) -> None:
    self.release()

  # -------------------------------------------------------------- internals

  def _payload(self) -> bytes:
    return (json.dumps(self.record, indent=1) + "\n").encode("utf-8")

  def _create_exclusive(self) -> bool:
    """Creates the lock with O_EXCL; False if it exists."""
    try:
      fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    try:
      os.write(fd, self._payload())
      os.fsync(fd)
    finally:
      os.close(fd)
    return True

  def _read_holder(self, retry: bool = True) -> dict[str, Any] | None:
    """The lock's JSON; None if it stays empty or unparseable.

    A lock just created by another process may be read before its content
    is written, so an unparseable file is re-read for a moment.
    """
    deadline = time.monotonic() + (_READ_RETRY_S if retry else 0.0)
    while True:
      try:
        if self._remote:
          text = self.path.read_text()
        else:
          with open(self.path) as f:
            text = f.read()
        holder = json.loads(text)
        if isinstance(holder, dict):
          return holder
      except FileNotFoundError:
        return {}
      except (OSError, ValueError):
        pass
      if time.monotonic() >= deadline:
        return None
      time.sleep(0.05)

  def _take_over(self, stale: dict[str, Any]) -> None:
    """Replaces a stale lock, serialised by an O_EXCL guard file.

    Without the guard, two jobs that both judged the same lock stale could
    each delete it, and the second would delete the first one's new lock.
    """
    guard = self.path + ".takeover"
    try:
      if time.time() - os.path.getmtime(guard) > _GUARD_STALE_S:
        os.unlink(guard)
    except OSError:
      pass
    try:
      fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      raise self._locked_error(self._read_holder()) from None
    os.close(fd)
    try:
      current = self._read_holder(retry=False)
      if current and current != stale:
        raise self._locked_error(current)
      try:
        os.unlink(self.path)
      except FileNotFoundError:
        pass
      if not self._create_exclusive():
        raise self._locked_error(self._read_holder())
    finally:
      os.unlink(guard)
    logging.warning(
        "Took over the stale workdir lock %s of %s (that process is gone).",
        self.path, describe(stale),
    )

  def _acquire_remote(self) -> None:
    """Write-then-check for paths without exclusive create (weaker)."""
    self.path.parent.mkdir(parents=True, exist_ok=True)
    if self.path.exists():
      holder = self._read_holder()
      if holder is None or not holder_is_stale(holder):
        raise self._locked_error(holder)
      logging.warning(
          "Taking over the stale workdir lock %s of %s.", self.path,
          describe(holder),
      )
    self.path.write_bytes(self._payload())
    time.sleep(_REMOTE_SETTLE_S)
    holder = self._read_holder()
    if not holder or holder.get("token") != self.record["token"]:
      raise self._locked_error(holder)

  def _locked_error(self, holder: dict[str, Any] | None) -> WorkdirLockedError:
    return WorkdirLockedError(
        f"workdir {os.path.dirname(os.fspath(self.path))} is in use by "
        f"{describe(holder)}; lock file {os.fspath(self.path)}. Wait for "
        "that run to end or stop it, or pass another --workdir; if it is "
        "no longer running, delete the lock file."
    )
