"""The workdir lock with real processes: exclusion, stale takeover, release.

Holders are real Python processes (the module imports no jax, so each starts
in a fraction of a second); the lock's guarantees are about processes.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest
from etils import epath

from pix2seq_d_jax import workdir_lock
from pix2seq_d_jax.workdir_lock import WorkdirLock, WorkdirLockedError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Acquires the lock on argv[1], then prints `ok PID` or `locked MESSAGE`;
# with argv[2] == 'hold' it keeps the lock until stdin closes.
_CHILD = textwrap.dedent("""
    import sys
    from pix2seq_d_jax.workdir_lock import WorkdirLock, WorkdirLockedError
    try:
      lock = WorkdirLock(sys.argv[1]).acquire()
    except WorkdirLockedError as e:
      print('locked', e, flush=True)
      sys.exit(2)
    print('ok', lock.record['pid'], flush=True)
    if sys.argv[2:] == ['hold']:
      sys.stdin.read()
    lock.release()
""")


def _child(workdir, *args, **kwargs):
  return subprocess.Popen(
      [sys.executable, "-c", _CHILD, str(workdir), *args],
      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True, cwd=REPO, **kwargs)


def _dead_pid():
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


def test_second_process_fails_fast_naming_holder(tmp_path):
  holder = _child(tmp_path, "hold")
  try:
    first = holder.stdout.readline().split()
    assert first[0] == "ok", first
    record = json.loads((tmp_path / "lock").read_text())
    assert record["pid"] == int(first[1]) == holder.pid
    assert record["host"] == socket.gethostname()
    assert {"start_time", "command"} <= set(record)

    start = time.monotonic()
    second = _child(tmp_path)
    out, _ = second.communicate(timeout=30)
    assert time.monotonic() - start < 10
    assert second.returncode == 2
    (line,) = out.splitlines()
    assert line.startswith("locked workdir ")
    assert f"pid {holder.pid} on host {socket.gethostname()}" in line
    assert f"started {record['start_time']}" in line
    assert f"lock file {tmp_path / 'lock'}" in line
    assert "delete the lock file" in line
    # The loser left the holder's lock alone.
    assert json.loads((tmp_path / "lock").read_text()) == record
  finally:
    holder.stdin.close()
    holder.wait(timeout=30)
  # The holder released on exit: the lock file is gone.
  assert holder.returncode == 0
  assert not (tmp_path / "lock").exists()


def test_concurrent_starts_exactly_one_wins(tmp_path):
  procs = [_child(tmp_path, "hold") for _ in range(4)]
  lines = [p.stdout.readline().split(maxsplit=1) for p in procs]
  try:
    winners = [
        p for p, line in zip(procs, lines, strict=True) if line[0] == "ok"]
    assert len(winners) == 1, lines
    assert sum(line[0] == "locked" for line in lines) == 3
    record = json.loads((tmp_path / "lock").read_text())
    assert record["pid"] == winners[0].pid
  finally:
    for p in procs:
      p.stdin.close()
      p.wait(timeout=30)


def test_stale_lock_of_dead_pid_is_taken_over(tmp_path):
  dead = _dead_pid()
  stale = {"host": socket.gethostname(), "pid": dead,
           "start_time": "2026-01-01T00:00:00+00:00", "command": "old run"}
  (tmp_path / "lock").write_text(json.dumps(stale))
  proc = _child(tmp_path, "hold")
  try:
    assert proc.stdout.readline().split()[0] == "ok"
    record = json.loads((tmp_path / "lock").read_text())
    assert record["pid"] == proc.pid
  finally:
    proc.stdin.close()
    proc.wait(timeout=30)
  err = proc.stderr.read()
  assert "Took over the stale workdir lock" in err
  assert f"pid {dead} on host" in err
  assert not (tmp_path / "lock").exists()


def test_reused_pid_is_stale_but_live_holder_is_not(tmp_path):
  # Our own pid with another process start time: the pid was reused.
  me = WorkdirLock(tmp_path).record
  reused = dict(me, start_ticks=(me["start_ticks"] or 0) + 1)
  if me["start_ticks"] is not None:
    assert workdir_lock.holder_is_stale(reused)
  assert not workdir_lock.holder_is_stale(me)
  # Another host's pid cannot be checked from here: never stale.
  other = dict(me, host=me["host"] + "-elsewhere", pid=_dead_pid())
  assert not workdir_lock.holder_is_stale(other)
  (tmp_path / "lock").write_text(json.dumps(other))
  with pytest.raises(WorkdirLockedError, match="-elsewhere"):
    WorkdirLock(tmp_path).acquire()


def test_release_removes_only_our_lock(tmp_path):
  lock = WorkdirLock(epath.Path(tmp_path) / "run")  # epath, created.
  with lock:
    assert (tmp_path / "run" / "lock").exists()
    assert lock.held
  assert not (tmp_path / "run" / "lock").exists()
  # Someone replaced the lock while we held it (e.g. removed by hand and a
  # new run started): release must not delete theirs.
  lock.acquire()
  theirs = {"host": "h", "pid": 1, "start_time": "t", "token": "x"}
  (tmp_path / "run" / "lock").write_text(json.dumps(theirs))
  lock.release()
  assert json.loads((tmp_path / "run" / "lock").read_text()) == theirs


def test_non_lead_process_holds_nothing(tmp_path):
  with WorkdirLock(tmp_path, is_lead=False) as lock:
    assert not (tmp_path / "lock").exists()
    assert not lock.held
  # ... and does not fail on a workdir the lead has locked.
  with WorkdirLock(tmp_path):
    WorkdirLock(tmp_path, is_lead=False).acquire()


def test_unreadable_lock_is_not_stolen(tmp_path):
  (tmp_path / "lock").write_text("")  # Writer died between create and write.
  with pytest.raises(WorkdirLockedError, match="unknown process"):
    WorkdirLock(tmp_path).acquire()
  assert (tmp_path / "lock").read_text() == ""


def test_remote_write_then_check(tmp_path, monkeypatch):
  # The remote branch (no O_EXCL), exercised on a local epath.
  monkeypatch.setattr(workdir_lock, "_REMOTE_SETTLE_S", 0.0)
  lock = WorkdirLock(tmp_path)
  lock._remote, lock.path = True, epath.Path(tmp_path) / "lock"
  lock.acquire()
  other = WorkdirLock(tmp_path)
  other._remote, other.path = True, epath.Path(tmp_path) / "lock"
  with pytest.raises(WorkdirLockedError, match=f"pid {os.getpid()} on host"):
    other.acquire()
  lock.release()
  assert not (tmp_path / "lock").exists()
