r"""Runs N pix2seq_d_jax processes on this machine, as a multi-host job would.

  python launch/local.py --num_processes=N [--port=P] \
      [--devices_per_process=D] [--log_dir=DIR] [--dry_run] \
      -- --config=configs/synthetic.py:tiny --workdir=/tmp/p2sd ...

Each process runs `python -m pix2seq_d_jax.main --distributed
--coordinator_address=127.0.0.1:P --num_processes=N --process_id=i <flags>`
from the repository root on the CPU backend (`JAX_PLATFORMS=cpu`), with D
fake CPU devices each when D > 1. This exercises the multi-host code paths
(process-local batches assembled into global arrays, gloo collectives,
per-process data shards, process-0-only summaries) without a cluster.

Process i's output goes to DIR/process_i.log; process 0's is also echoed
here. If one process fails the others are stopped (SIGTERM, then SIGKILL),
and the launcher exits with the first non-zero status. SIGINT/SIGTERM to the
launcher are forwarded to every process. `--dry_run` prints the commands.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
  """A TCP port on 127.0.0.1 that is free right now."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_env(devices_per_process: int) -> dict[str, str]:
  """Environment variables the launcher sets for every process."""
  env = {"JAX_PLATFORMS": "cpu"}
  if devices_per_process > 1:
    flag = f"--xla_force_host_platform_device_count={devices_per_process}"
    env["XLA_FLAGS"] = " ".join(
        x for x in (os.environ.get("XLA_FLAGS", ""), flag) if x
    )
  return env


def commands(
    num_processes: int, port: int, main_args: list[str]
) -> list[list[str]]:
  """The command line of each process, process 0 first."""
  return [
      [
          sys.executable, "-m", "pix2seq_d_jax.main", "--distributed",
          f"--coordinator_address=127.0.0.1:{port}",
          f"--num_processes={num_processes}", f"--process_id={i}",
          *main_args,
      ]
      for i in range(num_processes)
  ]


def _workdir(main_args: list[str]) -> str | None:
  for i, arg in enumerate(main_args):
    if arg.startswith("--workdir="):
      return arg.split("=", 1)[1]
    if arg == "--workdir" and i + 1 < len(main_args):
      return main_args[i + 1]
  return None


def _parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
  parser = argparse.ArgumentParser(
      prog="launch/local.py",
      description="Run N pix2seq_d_jax processes on this machine.",
      epilog="Flags after -- go to every pix2seq_d_jax.main process.",
  )
  parser.add_argument("--num_processes", type=int, required=True)
  parser.add_argument("--port", type=int, default=None,
                      help="coordinator port (default: a free one)")
  parser.add_argument("--devices_per_process", type=int, default=1,
                      help="fake CPU devices per process")
  parser.add_argument("--log_dir", default=None,
                      help="default: <workdir>/logs, else a temporary dir")
  parser.add_argument("--kill_grace_secs", type=float, default=10.0,
                      help="SIGTERM to SIGKILL delay when stopping")
  parser.add_argument("--dry_run", action="store_true",
                      help="print the commands instead of running them")
  if "--" in argv:
    cut = argv.index("--")
    own, main_args = argv[:cut], argv[cut + 1:]
  else:
    own, main_args = argv, []
  args = parser.parse_args(own)
  if args.num_processes < 1:
    parser.error(f"--num_processes={args.num_processes}: expected >= 1")
  if args.devices_per_process < 1:
    parser.error(
        f"--devices_per_process={args.devices_per_process}: expected >= 1"
    )
  if args.port is not None and not 0 < args.port < 65536:
    parser.error(f"--port={args.port}: expected 1..65535")
  if not main_args:
    parser.error("expected pix2seq_d_jax.main flags after --")
  return args, main_args


def _pump(proc: subprocess.Popen, path: str, echo: bool) -> None:
  """Copies a process's output into its log file (and here, if `echo`)."""
  with open(path, "w") as log:
    for line in proc.stdout:
      log.write(line)
      log.flush()
      if echo:
        sys.stdout.write(line)
        sys.stdout.flush()


def _stop(procs: list[subprocess.Popen], grace_secs: float) -> None:
  """SIGTERM to running processes; SIGKILL to those alive after grace."""
  for p in procs:
    if p.poll() is None:
      p.send_signal(signal.SIGTERM)
  deadline = time.time() + grace_secs
  for p in procs:
    try:
      p.wait(timeout=max(0.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
      p.kill()
      p.wait()


def _exit_status(returncode: int) -> int:
  # A process killed by signal s reports -s; shells report 128 + s.
  return 128 - returncode if returncode < 0 else returncode


def run(args: argparse.Namespace, main_args: list[str]) -> int:
  """Starts the processes, waits, and returns the launcher's exit status."""
  port = args.port or free_port()
  env_vars = process_env(args.devices_per_process)
  cmds = commands(args.num_processes, port, main_args)
  if args.dry_run:
    env_text = " ".join(f"{k}={shlex.quote(v)}" for k, v in env_vars.items())
    for cmd in cmds:
      print(f"cd {shlex.quote(REPO)} && {env_text} {shlex.join(cmd)}")
    return 0
  log_dir = args.log_dir
  if log_dir is None:
    workdir = _workdir(main_args)
    log_dir = (os.path.join(workdir, "logs") if workdir
               else tempfile.mkdtemp(prefix="pix2seq_d_jax_local_"))
  os.makedirs(log_dir, exist_ok=True)
  env = dict(os.environ, **env_vars)
  procs, pumps = [], []
  for i, cmd in enumerate(cmds):
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, errors="replace",
    )
    pump = threading.Thread(
        target=_pump,
        args=(proc, os.path.join(log_dir, f"process_{i}.log"), i == 0),
        daemon=True,
    )
    pump.start()
    procs.append(proc)
    pumps.append(pump)
  print(f"launch/local.py: {args.num_processes} processes on 127.0.0.1:"
        f"{port}; logs in {log_dir}", file=sys.stderr)

  interrupted = []
  previous = {
      s: signal.signal(s, lambda signum, frame: interrupted.append(signum))
      for s in (signal.SIGINT, signal.SIGTERM)
  }
  finished = []  # Process indices in the order they exited.
  try:
    while len(finished) < len(procs):
      finished += [i for i, p in enumerate(procs)
                   if i not in finished and p.poll() is not None]
      failed = [i for i in finished if procs[i].returncode]
      if failed or interrupted:
        if failed and not interrupted:
          print(f"launch/local.py: process {failed[0]} exited with "
                f"{_exit_status(procs[failed[0]].returncode)}; stopping the "
                "others", file=sys.stderr)
        # SIGTERM lets the others checkpoint and stop; after the grace
        # period (a peer may wait forever on a dead one) they are killed.
        _stop(procs, args.kill_grace_secs)
        finished += [i for i in range(len(procs)) if i not in finished]
        break
      time.sleep(0.1)
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
  for pump in pumps:
    pump.join()
  for i in finished:
    if procs[i].returncode:
      status = _exit_status(procs[i].returncode)
      print(f"launch/local.py: process {i} exited with {status} (see "
            f"{log_dir}/process_{i}.log)", file=sys.stderr)
      return status
  return 0


def main(argv: list[str] | None = None) -> int:
  args, main_args = _parse(sys.argv[1:] if argv is None else argv)
  return run(args, main_args)


if __name__ == "__main__":
  sys.exit(main())
