"""The package's layers (docs/design.md): no import cycle among the project's modules, dependencies
pointing down only, and imports inside functions only for optional or heavy packages, with a reason.

Read from the source (`ast`), so a cycle is caught even where Python would tolerate it at run time
(an import inside a function, or one that happens to run late)."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "retinanet_jax"

# Bottom to top; a module may import its own package's modules and those of lower layers only.
# "core" is the package's root modules (the notebook API: boxes, anchors, matching, ...).
LAYERS = (
    ("core", "runtime"),
    ("models", "metrics", "data"),
    ("checkpoints",),
    ("config",),
    ("inference",),
    ("deploy", "evaluation"),
    ("training",),
)
LAYER_OF = {name: level for level, names in enumerate(LAYERS) for name in names}


def module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, pathlib.Path]:
  return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def resolve(name: str, modules) -> str | None:
  """The project module `name` refers to (a module, or the package that holds an attribute)."""
  while name and name not in modules:
    name = name.rpartition(".")[0]
  return name or None


def project_imports(path: pathlib.Path, modules):
  """`(line, target module, inside a function)` for every import of a project module in `path`."""
  tree = ast.parse(path.read_text())
  in_function = set()
  for node in ast.walk(tree):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
      in_function.update(id(n) for n in ast.walk(node) if n is not node)
  out = []
  for node in ast.walk(tree):
    names = []
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names = [f"{node.module}.{a.name}" for a in node.names]
    for name in names:
      if name.split(".")[0] == "retinanet_jax":
        target = resolve(name, modules)
        if target:
          out.append((node.lineno, target, id(node) in in_function))
  return out


def layer_of(module: str) -> tuple[str, int]:
  parts = module.split(".")
  if len(parts) == 1 or (len(parts) == 2 and parts[1] not in LAYER_OF):
    return "core", LAYER_OF["core"]
  if parts[1] not in LAYER_OF:
    raise AssertionError(f"{module}: the package {parts[1]!r} is in no layer of tests/test_layout.py "
                         f"(add it to LAYERS and to docs/design.md)")
  return parts[1], LAYER_OF[parts[1]]


def import_graph():
  modules = all_modules()
  return {m: {t for _, t, _ in project_imports(p, modules) if t != m} for m, p in modules.items()}


def find_cycle(graph):
  """One cycle as a list of modules `[a, b, ..., a]`, or None."""
  state, stack = {}, []

  def visit(node):
    state[node] = "open"
    stack.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == "open":
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state:
        found = visit(nxt)
        if found:
          return found
    stack.pop()
    state[node] = "done"
    return None

  for node in sorted(graph):
    if node not in state:
      found = visit(node)
      if found:
        return found
  return None


def test_find_cycle_finds_a_cycle_and_only_one():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set(), "d": {"a", "c"}}) is None


def test_no_import_cycle_among_the_projects_modules():
  cycle = find_cycle(import_graph())
  assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_dependencies_point_down():
  modules = all_modules()
  wrong = []
  for module, path in modules.items():
    package, level = layer_of(module)
    for line, target, _ in project_imports(path, modules):
      if module == "retinanet_jax" and target != module and layer_of(target)[0] == "core":
        continue
      target_package, target_level = layer_of(target)
      if target_package != package and target_level >= level:
        wrong.append(f"{path.relative_to(ROOT)}:{line}: {package} (layer {level}) imports "
                     f"{target} ({target_package}, layer {target_level})")
  assert not wrong, "imports that point up or sideways:\n" + "\n".join(wrong)


def _reason(line: str) -> str:
  """The comment of a source line without its tool directives (pylint, noqa)."""
  if "#" not in line:
    return ""
  comments = line.split("#", 1)[1].split("#")
  return " ".join(c.strip() for c in comments
                  if c.strip() and not c.strip().startswith(("pylint:", "noqa"))).strip()


def test_imports_inside_functions_are_optional_or_heavy_and_say_why():
  modules = all_modules()
  project, unexplained = [], []
  for module, path in modules.items():
    lines = path.read_text().splitlines()
    for line, target, inside in project_imports(path, modules):
      if inside:
        project.append(f"{path.relative_to(ROOT)}:{line}: {lines[line - 1].strip()}")
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        for sub in ast.walk(node):
          if isinstance(sub, (ast.Import, ast.ImportFrom)):
            here, above = lines[sub.lineno - 1], lines[sub.lineno - 2].strip()
            if not _reason(here) and not (above.startswith("#") and _reason(above)):
              unexplained.append(f"{path.relative_to(ROOT)}:{sub.lineno}: {here.strip()}")
  assert not project, ("imports of the project's own modules inside functions (a module in the "
                       "wrong layer?):\n" + "\n".join(project))
  assert not unexplained, ("imports inside functions without a reason in a comment:\n"
                           + "\n".join(unexplained))


@pytest.mark.parametrize("line,reason", [
    ("  import torch  # pylint: disable=import-outside-toplevel", ""),
    ("  import torch  # heavy: only for .pth files  # pylint: disable=x", "heavy: only for .pth files"),
    ("  import onnx  # noqa: F401", ""),
])
def test_reason_ignores_tool_directives(line, reason):
  assert _reason(line) == reason


def test_the_notebook_api_is_importable_from_the_package():
  import retinanet_jax  # pylint: disable=import-outside-toplevel

  for name in ("generate_anchors", "batch_match_anchors", "label_anchors", "sigmoid_focal_loss",
               "retinanet_loss", "postprocess_detections", "BoxCoder", "pairwise_iou"):
    assert callable(getattr(retinanet_jax, name)), name
