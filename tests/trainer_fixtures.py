"""Tiny training configs for the trainer tests (the 'testing' ViT on the digits dataset)."""

import contextlib
import importlib.util
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")


def load_config_file(name: str, arg=None):
  """`configs/<name>.py`'s get_config(arg), loaded the way config_flags loads it (by path)."""
  path = os.path.join(CONFIGS, f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"_test_config_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg is not None else module.get_config()


# Overrides that shrink the default job to the 'testing' model (width 32, 2 layers,
# patch 4, 16 px), as command-line flags for subprocesses.
TINY_FLAGS = {
    "model.hidden_size": 32, "model.mlp_dim": 128, "model.num_heads": 2,
    "model.num_layers": 2, "batch_size": 64, "eval_batch_size": 360,
    "warmup_steps": 10, "log_every": 10, "plots": False, "lr": 1e-2,
    # No Inception crop: short runs learn much faster on the unaugmented digits.
    "pp.area_range": (1.0, 1.0),
}


def tiny_config(**overrides):
  """The default digits job shrunk to the tiny model; `overrides` set top-level fields."""
  return shrink(load_config_file("default"), **overrides)


def shrink(config, **overrides):
  """`config` with TINY_FLAGS applied, then `overrides` (top-level fields)."""
  for key, value in TINY_FLAGS.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  config.update(overrides)
  return config


def as_flags(values: dict) -> list[str]:
  return [f"--config.{k}={v}" for k, v in values.items()]


@contextlib.contextmanager
def compilation_cache(directory: str):
  """In-process runs share XLA's persistent cache in `directory`: a run whose step has
  the same HLO as an earlier one (e.g. only the seed differs) loads it, not compiles it."""
  import jax  # pylint: disable=g-import-not-at-top
  previous = (jax.config.jax_compilation_cache_dir,
              jax.config.jax_persistent_cache_min_compile_time_secs)
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  try:
    yield
  finally:
    jax.config.update("jax_compilation_cache_dir", previous[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", previous[1])
