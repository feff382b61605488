"""Where a compiled program's time goes, by kind of operation.

A profile (`jax.profiler`, written as a Perfetto JSON trace) names each
executed XLA instruction of the compiled program; the optimised HLO text
(`compiled.as_text()`) says what each instruction is. Joining the two gives
the summed time per category:

- `conv forward`, `conv input-grad`, `conv weight-grad`: convolutions. A
  backward convolution carries `transpose(` in its metadata (or none, as
  XLA's weight-gradient rewrite drops it); it computes the input gradient
  when its output has the batch's leading size, the weight gradient
  otherwise (its "batch" is a channel dimension).
- `matmul`: dots (and fusions or library calls around one).
- `transpose/copy`: layout changes (transposes, copies).
- `optimizer`: everything under the `optimizer` name scope of the train
  step (AdamW, clipping, EMA), whatever its kind.
- `other`: elementwise fusions, reductions, normalisation, RNG, ...

The profiler records each execution of an instruction once, on the thread
that ran it, with its wall duration: an instruction that splits its work
over the thread pool is one record, and instructions that ran side by side
each count. The summed op time is therefore close to the wall time when
the program runs one operation at a time (the memory-minimising
scheduler), and a share is of that sum.

XLA:CPU runs a convolution it hands to Eigen asynchronously: the traced
event is only its launch, and the next operation starts when the
convolution is done. So such an instruction (`launched_instructions`)
counts until the next operation's event starts, which is exact when the
program runs one operation at a time.
"""

from __future__ import annotations

import bisect
import collections
import glob
import gzip
import json
import os
import re
import tempfile
from collections.abc import Callable, Collection
from typing import Any

import jax

CATEGORIES = ("conv forward", "conv input-grad", "conv weight-grad",
              "matmul", "transpose/copy", "optimizer", "other")
# Instructions that only contain others (their time is their body's).
_CONTAINERS = {"while", "conditional", "call", "tuple",
               "get-tuple-element", "parameter", "constant", "bitcast"}
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s([a-z][\w\-]*)\((.*)$")
_SHAPE_DIMS = re.compile(r"\[([\d,]*)\]")


def _parse(hlo_text: str
           ) -> tuple[dict[str, dict], dict[str, set], dict[str, dict]]:
  """({instruction: fields}, {computation: opcodes in it},
  {computation: fields of its convolution})."""
  instructions: dict[str, dict] = {}
  opcodes: dict[str, set] = collections.defaultdict(set)
  convolutions: dict[str, dict] = {}
  computation = ""
  for line in hlo_text.splitlines():
    header = _COMPUTATION.match(line)
    if header and " = " not in line:
      computation = header.group(1)
      continue
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    name, shape, opcode, rest = match.groups()
    opcodes[computation].add(opcode)
    called = re.search(r"calls=%?([\w.\-]+)", rest)
    op_name = re.search(r'op_name="([^"]*)"', rest)
    labels = re.search(r"dim_labels=([\w]+)_([\w]+)->([\w]+)", rest)
    target = re.search(r'custom_call_target="([^"]*)"', rest)
    instructions[name] = dict(
        opcode=opcode, shape=shape, called=called and called.group(1),
        op_name=op_name.group(1) if op_name else "",
        out_labels=labels.group(3) if labels else None,
        target=target.group(1) if target else "")
    if opcode == "convolution":
      convolutions.setdefault(computation, instructions[name])
  return instructions, opcodes, convolutions


def _conv_kind(inst: dict, batch_size: int) -> str:
  dims = _SHAPE_DIMS.search(inst["shape"])
  out = [int(d) for d in dims.group(1).split(",")] if dims and dims.group(
      1) else []
  labels = inst["out_labels"]
  batch_dim = out[labels.index("b")] if labels and len(out) == len(
      labels) else None
  backward = "transpose(" in inst["op_name"] or not inst["op_name"]
  if batch_dim is not None and batch_dim != batch_size:
    return "conv weight-grad"
  return "conv input-grad" if backward else "conv forward"


def op_categories(hlo_text: str, batch_size: int) -> dict[str, str]:
  """{instruction name: category} of an optimised HLO module's text.

  Args:
    hlo_text: `compiled.as_text()` of the program.
    batch_size: the batch size its convolutions see (the micro-batch
      under gradient accumulation), which tells the two backward
      convolutions apart.

  Returns:
    A category of `CATEGORIES` per instruction; container instructions
    (loops, conditionals, tuples, parameters) are left out.
  """
  instructions, opcodes, convolutions = _parse(hlo_text)
  out = {}
  for name, inst in instructions.items():
    opcode = inst["opcode"]
    if opcode in _CONTAINERS:
      continue
    inner = opcodes.get(inst["called"] or "", set()) | {opcode}
    target = inst["target"].lower()
    if "optimizer" in inst["op_name"].split("/"):
      out[name] = "optimizer"
    elif "convolution" in inner or "conv" in target:
      # A fusion around a convolution: the convolution's own fields.
      conv = convolutions.get(inst["called"] or "", inst)
      out[name] = _conv_kind(
          dict(conv, op_name=conv["op_name"] or inst["op_name"]),
          batch_size)
    elif "dot" in inner or "matmul" in target or "dot" in target:
      out[name] = "matmul"
    elif opcode in ("transpose", "copy") or inner <= {
        "transpose", "copy", "bitcast", "parameter"} or re.search(
            r"transpose|copy", name):
      out[name] = "transpose/copy"
    else:
      out[name] = "other"
  return out


def launched_instructions(hlo_text: str) -> set[str]:
  """Instructions whose traced event may be only their launch.

  Every convolution instruction of the program. Those inside a fusion
  never appear as events of their own (their fusion does), so this
  selects, in a trace, the unfused convolutions: XLA:CPU runs those it
  gives to Eigen asynchronously.
  """
  instructions, _, _ = _parse(hlo_text)
  return {name for name, inst in instructions.items()
          if inst["opcode"] == "convolution"}


def op_durations(events: list[dict], *, launched: Collection[str] = (),
                 ops: Collection[str] = ()) -> dict[str, float]:
  """Summed seconds per event name of a trace's complete ('X') events.

  Args:
    events: Perfetto/Chrome trace events (`ts` and `dur` in µs).
    launched: names whose event is only a launch: each execution counts
      until the next event of `ops` starts (at least its own duration).
    ops: the names that make up the program's timeline.

  Returns:
    {event name: seconds}, summed over its executions.
  """
  complete = [e for e in events if e.get("ph") == "X"]
  starts = sorted(e["ts"] for e in complete if e["name"] in ops)
  times: dict[str, float] = collections.defaultdict(float)
  for event in complete:
    duration = event.get("dur", 0.0)
    if event["name"] in launched:
      later = bisect.bisect_right(starts, event["ts"])
      if later < len(starts):
        duration = max(duration, starts[later] - event["ts"])
    times[event["name"]] += duration * 1e-6
  return dict(times)


def traced_op_times(run: Callable[[], Any], *, repeats: int,
                    launched: Collection[str] = (),
                    ops: Collection[str] = ()) -> dict[str, float]:
  """Summed seconds per executed instruction name over `repeats` runs.

  Args:
    run: one blocked execution of the program (it may close over and
      update its own state between calls).
    repeats: runs inside the trace.
    launched, ops: as for `op_durations` (`launched_instructions` and
      the program's instruction names).

  Returns:
    {instruction name: seconds}, summed over its executions and runs.
    Python and runtime events (names that are no HLO instruction) are
    included; the caller keeps the names it knows.
  """
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    try:
      for _ in range(repeats):
        run()
    finally:
      jax.profiler.stop_trace()
    (path,) = glob.glob(os.path.join(trace_dir, "**",
                                     "perfetto_trace.json.gz"),
                        recursive=True)
    with gzip.open(path, "rt") as f:
      trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  return op_durations(events, launched=launched, ops=ops)


def category_shares(categories: dict[str, str],
                    op_times: dict[str, float]) -> dict[str, Any]:
  """Seconds and share of the summed op time per category.

  Returns:
    {"seconds": {category: s}, "share": {category: fraction},
    "total_s": summed op seconds, "top": the 10 longest instructions as
    [name, category, seconds]}.
  """
  seconds = dict.fromkeys(CATEGORIES, 0.0)
  timed = [(name, categories[name], t) for name, t in op_times.items()
           if name in categories]
  for _, category, t in timed:
    seconds[category] += t
  total = sum(seconds.values())
  return {
      "seconds": seconds,
      "share": {k: (v / total if total else 0.0) for k, v in seconds.items()},
      "total_s": total,
      "top": [list(x) for x in sorted(timed, key=lambda x: -x[2])[:10]],
  }
