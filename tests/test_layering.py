"""The package's import layering, read from the source with `ast`.

Every import of pix2seq_d_jax is collected, at module level and inside
functions (a lazy import is still a dependency), and mapped to top-level
units: a subpackage (`data`, `evaluation`, ...) or a top-level module
(`train`, `config_lib`, ...). The layers, top to bottom: entry points
(`main`, `predict`, `predict_video`, `benchmark`, `instance_study`), run
(`train`, `experiment`), inference and evaluators, domain (`models`,
`diffusion`, `data`, `evaluation`), formats, infrastructure (`config_lib`,
`sharding`, `checkpointing`, `reporting`). Edges that are known and not yet
fixed are in `ALLOWED`, each with the reason; the test fails when one
disappears too, so the list only shrinks.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = 'pix2seq_d_jax'
ROOT = pathlib.Path(__file__).resolve().parents[1] / PACKAGE

INFRASTRUCTURE = ('config_lib', 'sharding', 'checkpointing', 'reporting')
DOMAIN = ('models', 'diffusion', 'data', 'evaluation')
ABOVE_DOMAIN = (
    'train', 'experiment', 'predict', 'predict_video', 'inference',
    'benchmark', 'main', 'evaluators', 'instance_study',
)

# (importing unit, imported unit) -> why the edge is still there.
ALLOWED = {
    ('config_lib', 'diffusion'): (
        'config_lib.validate imports the diffusion name tuples (BIT_CODES, '
        'SCHEDULES, LOSS_TYPES, SAMPLERS) lazily; they move below '
        'config_lib once diffusion/ is free to edit'
    ),
}


def _unit(module: str) -> str | None:
  """`pix2seq_d_jax.data.davis` -> 'data'; None outside the package."""
  parts = module.split('.')
  if parts[0] != PACKAGE or len(parts) < 2:
    return None
  return parts[1]


def _imported_units(tree: ast.AST, module: str) -> set[tuple[str, int]]:
  """(unit, line) of every pix2seq_d_jax import anywhere in `tree`."""
  found = set()
  package = module.rsplit('.', 1)[0]
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        if unit := _unit(alias.name):
          found.add((unit, node.lineno))
    elif isinstance(node, ast.ImportFrom):
      if node.level:  # Relative: resolve against this module's package.
        base = package.split('.')[: len(package.split('.')) - node.level + 1]
        target = '.'.join(base + ([node.module] if node.module else []))
      else:
        target = node.module or ''
      if target == PACKAGE:  # from pix2seq_d_jax import data, train
        found.update((alias.name, node.lineno) for alias in node.names)
      elif unit := _unit(target):
        found.add((unit, node.lineno))
    elif (
        isinstance(node, ast.Call)
        and getattr(node.func, 'attr', getattr(node.func, 'id', ''))
        == 'import_module'
        and node.args
        and isinstance(node.args[0], ast.Constant)
        and isinstance(node.args[0].value, str)
    ):
      if unit := _unit(node.args[0].value):
        found.add((unit, node.lineno))
  return found


def _edges() -> dict[tuple[str, str], list[str]]:
  """(from unit, to unit) -> ['module:line', ...], self-edges left out."""
  edges: dict[tuple[str, str], list[str]] = {}
  for path in sorted(ROOT.rglob('*.py')):
    rel = path.relative_to(ROOT.parent).with_suffix('')
    module = '.'.join(rel.parts)
    if module.endswith('.__init__'):
      module = module[: -len('.__init__')] + '.__init__'
    src = _unit(module)
    if src is None or src == '__init__':
      continue
    tree = ast.parse(path.read_text(), filename=str(path))
    for dst, line in _imported_units(tree, module):
      if dst != src:
        edges.setdefault((src, dst), []).append(f'{module}:{line}')
  return edges


EDGES = _edges()


def _violations(bad) -> list[str]:
  return [
      f'{src} -> {dst} at {", ".join(sorted(where))}'
      for (src, dst), where in sorted(EDGES.items())
      if bad(src, dst) and (src, dst) not in ALLOWED
  ]


def test_the_walk_sees_module_and_function_level_imports():
  # Known edges of both kinds, so an empty graph cannot pass vacuously.
  assert ('data', 'formats') in EDGES  # module level (data/coco_panoptic.py)
  assert ('main', 'train') in EDGES  # inside main.main()
  assert ('config_lib', 'diffusion') in EDGES  # inside validate()


def test_no_import_cycles_between_units():
  graph: dict[str, set[str]] = {}
  for src, dst in EDGES:
    if (src, dst) not in ALLOWED:
      graph.setdefault(src, set()).add(dst)
  # Tarjan's strongly connected components; any with two units is a cycle.
  index, low, stack, on_stack, cycles = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in graph.get(v, ()):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = set()
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.add(w)
        if w == v:
          break
      if len(component) > 1:
        cycles.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  details = [
      f'{src} -> {dst} at {", ".join(EDGES[src, dst])}'
      for cycle in cycles
      for src in cycle
      for dst in cycle
      if (src, dst) in EDGES and (src, dst) not in ALLOWED
  ]
  assert not cycles, f'import cycles {cycles}: {details}'


def test_data_and_evaluation_never_import_each_other():
  pair = {'data', 'evaluation'}
  assert not _violations(lambda s, d: {s, d} == pair)


def test_formats_imports_nothing_else_from_the_package():
  assert not _violations(lambda s, d: s == 'formats')


def test_infrastructure_knows_no_model_data_or_evaluation():
  upper = ('models', 'diffusion', 'data', 'evaluation', 'evaluators')
  assert not _violations(lambda s, d: s in INFRASTRUCTURE and d in upper)


@pytest.mark.parametrize('domain', DOMAIN)
def test_domain_packages_never_import_the_layers_above(domain):
  assert not _violations(lambda s, d: s == domain and d in ABOVE_DOMAIN)


def test_every_allowed_edge_still_exists():
  # A fixed edge must leave the list, so the list only shrinks.
  stale = [edge for edge in ALLOWED if edge not in EDGES]
  assert not stale, f'remove from ALLOWED, these imports are gone: {stale}'
