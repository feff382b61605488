"""Reading facts from XLA's optimised HLO text in tests."""

import re


def dot_operand_dtypes(compiled_text: str) -> list[tuple[str, str]]:
  """(lhs, rhs) dtypes of every dot in an optimised HLO module."""
  shapes, dots, computation = {}, [], ""
  for line in compiled_text.splitlines():
    header = re.match(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$", line)
    if header and " = " not in line:
      computation = header.group(1)
      continue
    m = re.match(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\S+)\s+([a-z][\w\-]*)"
                 r"\((.*)$", line)
    if not m:
      continue
    name, shape, opcode, rest = m.groups()
    shapes[(computation, name)] = shape.split("[")[0]
    if opcode == "dot":
      a, b = re.match(r"\s*%?([\w.\-]+),\s*%?([\w.\-]+)\)", rest).groups()
      dots.append((shapes[(computation, a)], shapes[(computation, b)]))
  return dots
