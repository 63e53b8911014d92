"""The one check of a training config, before anything is built or written.

`check_config(config)` reports every problem at once, each naming its field, in one
ConfigError; `make_mesh(config)` builds the device mesh with the field named on failure.
Defaults live only in configs/common.py: every field read here must be set there.
"""

import jax

from vit_jax import models
from vit_jax.parallel import mesh as mesh_lib
from vit_jax.training import evaluators
from vit_jax.training import objectives
from vit_jax.training import optim


class ConfigError(ValueError):
  """A config that cannot train; the message lists every problem found."""


_POSITIVE = ("total_steps", "log_every", "checkpoint_every", "batch_size", "eval_batch_size",
             "keep_checkpoints", "prefetch", "preemption_sync_every", "fsdp_min_size")
_NON_NEGATIVE = ("eval_every", "warmup_steps", "data_workers", "data_threads")


def make_mesh(config):
  """The device mesh of `config.mesh`, with the config field named in any error."""
  try:
    return mesh_lib.make_mesh(config.mesh)
  except ValueError as e:
    raise ConfigError(f"config.mesh={config.mesh!r} does not fit the {jax.device_count()} "
                      f"devices ({jax.devices()[0].platform}): {e} Set e.g. "
                      "--config.mesh=\"(('data', -1),)\".") from e


def _ranges(config) -> list[str]:
  lines = [f"config.{f}={config[f]} must be positive." for f in _POSITIVE if int(config[f]) <= 0]
  lines += [f"config.{f}={config[f]} must be >= 0." for f in _NON_NEGATIVE if int(config[f]) < 0]
  if int(config.accum_steps) < 1:
    lines.append(f"config.accum_steps must be >= 1, got {config.accum_steps}.")
  return lines


def _optimizer(config) -> list[str]:
  try:
    optim.make_optimizer(config)  # Schedule, optimizer name, warm-up and clipping.
  except ValueError as e:
    return [str(e)]
  return []


def _model(config) -> list[str]:
  try:
    models.from_config(config.model, None)
  except ValueError as e:
    return [str(e)]
  return []


def _batches(config, mesh) -> list[str]:
  lines = []
  for field, size, accum in (("batch_size", config.batch_size, config.accum_steps),
                             ("eval_batch_size", config.eval_batch_size, 1)):
    if int(size) <= 0 or int(accum) < 1:
      continue  # Reported by _ranges.
    try:
      mesh_lib.check_batch_divisible(int(size), mesh, int(accum), f"config.{field}")
    except ValueError as e:
      lines.append(str(e))
  return lines


def _recipes(config) -> list[str]:
  """RandAugment, EMA, layer decay and the config.evals entries (issue 14)."""
  from vit_jax.data import pipeline  # pylint: disable=g-import-not-at-top (grain)
  lines = []
  try:
    pipeline.randaugment_from_config(config)
  except ValueError as e:
    lines.append(str(e))
  if not 0.0 <= float(config.ema_decay) < 1.0:
    lines.append(f"config.ema_decay={config.ema_decay} must be in [0, 1) (0 = off; e.g. "
                 "0.9999).")
  if config.export_ema and not float(config.ema_decay) > 0:
    lines.append("config.export_ema=True needs config.ema_decay > 0.")
  if float(config.layer_decay) != 1.0 and config.objective != "classification":
    lines.append(f"config.layer_decay={config.layer_decay} is for fine-tuning a classifier; "
                 f"config.objective={config.objective!r} needs 1.0.")
  return lines + evaluators.problems(config)


def problems(config, mesh=None) -> list[str]:
  """Every problem of `config` (with `mesh`, also the batch layout), one line each."""
  lines = _ranges(config) + _optimizer(config) + _model(config)
  try:
    lines += objectives.get(config).problems(config)
  except ValueError as e:
    lines.append(str(e))
  lines += _recipes(config)
  if mesh is not None:
    lines += _batches(config, mesh)
  return lines


def check_config(config, mesh=None) -> None:
  """ConfigError listing every problem of `config` (see `problems`), if any."""
  lines = problems(config, mesh)
  if len(lines) == 1:
    raise ConfigError(lines[0])
  if lines:
    raise ConfigError(f"The config has {len(lines)} problems:\n  " + "\n  ".join(lines))
