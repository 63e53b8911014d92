"""The package's architecture, held by tests: which layer may import which, and the
parameter-tree names that sharding, checkpoints and interop build their paths from."""

import ast
import pathlib
import re

import jax
import jax.numpy as jnp

from vit_jax import models
from vit_jax.models import params as names
from vit_jax.parallel import shardings

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "vit_jax"

# layer -> the vit_jax layers it may import (besides itself).
ALLOWED = {
    "models": set(),
    "data": set(),
    "checkpoints": {"models"},
    "parallel": {"models"},
    "interop": {"models"},
}


def _modules():
  """{dotted module name: path} of every module of the package."""
  found = {}
  for path in PACKAGE.rglob("*.py"):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
  return found


def _imports(path: pathlib.Path) -> set[str]:
  """Every vit_jax module `path` imports, at the top or inside a function."""
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names if a.name.startswith("vit_jax"))
    elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("vit_jax"):
      out.add(node.module)
      out.update(f"{node.module}.{a.name}" for a in node.names)
  return out


def _layer(module: str):
  parts = module.split(".")
  return parts[1] if len(parts) > 2 or module in _packages() else None


def _packages():
  return {".".join(p.relative_to(PACKAGE.parent).parts) for p in PACKAGE.iterdir()
          if p.is_dir() and (p / "__init__.py").exists()}


def _commands():
  """Modules at the package root: all of them are commands (`python -m vit_jax.X`)."""
  return {f"vit_jax.{p.stem}" for p in PACKAGE.glob("*.py") if p.stem != "__init__"}


def test_the_package_root_holds_only_commands():
  for module in _commands():
    source = (PACKAGE / f"{module.split('.')[1]}.py").read_text()
    assert 'if __name__ == "__main__":' in source, f"{module} is not a command"


def test_layers_import_only_what_they_may():
  modules, commands = _modules(), _commands()
  problems = []
  for module, path in sorted(modules.items()):
    layer = _layer(module)
    for imported in sorted(_imports(path)):
      target = next((m for m in sorted(modules, key=len, reverse=True)
                     if imported == m or imported.startswith(m + ".")), None)
      if target is None or target == "vit_jax":
        continue
      if target in commands and module not in commands:
        problems.append(f"library module {module} imports the command {target}")
      target_layer = _layer(target)
      if layer in ALLOWED and target_layer not in {None, layer} | ALLOWED[layer]:
        problems.append(f"{module} ({layer}/) imports {target} ({target_layer}/)")
  assert not problems, "\n".join(problems)


def test_the_layering_check_sees_a_forbidden_import(tmp_path):
  bad = tmp_path / "bad.py"
  bad.write_text("def f():\n  from vit_jax.training import loop\n")
  assert "vit_jax.training.loop" in _imports(bad)


# --------------------------------------------------------------------- parameter names


def _param_paths(**overrides) -> set[str]:
  model = models.create("testing", num_classes=10, **overrides)
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  return set(names.flatten(variables["params"]))


def test_parameter_names_match_the_model():
  """A renamed layer in models/ fails here, not silently in sharding, checkpoints or interop."""
  paths = _param_paths(representation_size=8)
  block = f"{names.TRANSFORMER}/{names.block_name(0)}"
  expected = {
      f"{names.EMBEDDING}/kernel", f"{names.EMBEDDING}/bias", names.CLS, names.POSEMB,
      f"{names.TRANSFORMER}/{names.ENCODER_NORM}/scale",
      f"{names.PRE_LOGITS}/kernel", f"{names.HEAD}/kernel", f"{names.HEAD}/bias",
      f"{block}/{names.ATTENTION_NORM}/scale", f"{block}/{names.MLP_NORM}/scale",
      f"{block}/{names.MLP_IN}/kernel", f"{block}/{names.MLP_OUT}/kernel",
      f"{block}/{names.ATTENTION}/{names.ATTENTION_OUT}/kernel",
  } | {f"{block}/{names.ATTENTION}/{p}/kernel" for p in names.QKV}
  assert expected <= paths, sorted(expected - paths)
  # Exactly these layers in a block: a new or renamed one must be added to params.py.
  children = {p[len(block) + 1:].split("/")[0] for p in paths if p.startswith(block + "/")}
  assert children == {names.ATTENTION_NORM, names.ATTENTION, names.MLP_NORM, names.MLP}
  assert set(names.OLD_BLOCK_NAMES.values()) == children


def test_scanned_layout_uses_the_stacked_block_name():
  paths = _param_paths(scan=True)
  assert f"{names.TRANSFORMER}/{names.SCANNED_BLOCK}/{names.MLP_IN}/kernel" in paths
  assert not any(names.block_index(p.split("/")[1]) is not None for p in paths
                 if p.startswith(names.TRANSFORMER))


def test_every_tensor_parallel_rule_matches_a_parameter():
  paths = _param_paths()
  for pattern, _ in shardings.TP_RULES:
    assert any(re.search(pattern, p) for p in paths), pattern
