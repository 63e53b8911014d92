"""Learning-rate schedules and optimizers, following the ViT paper.

Pre-training: Adam (b1 0.9, b2 0.999) with decoupled weight decay 0.1, batch 4096, linear
warmup over 10k steps then linear decay -> `optimizer='adam', schedule='linear'`.
Fine-tuning: SGD with momentum 0.9, no weight decay, warmup then cosine decay
-> `optimizer='sgd', schedule='cosine'`. Both clip gradients at global norm
`grad_clip_norm` (1.0 in the paper; 0 or None turns clipping off).

Weight decay:
  - adam: decoupled (AdamW) as in optax: each step subtracts lr(t) * weight_decay * w,
    so the paper's 0.1 with lr 1e-3 shrinks weights by 1e-4 per step at the peak lr.
    It applies to kernels only (Dense and Conv weights, names ending in 'kernel');
    biases, LayerNorm/GroupNorm scales, `cls` and position embeddings are not decayed
    (big_vision's default): pulling normalisation scales and embeddings towards 0 is
    rarely wanted.
  - sgd: classic L2 (weight_decay * w added to the gradient before momentum), on the same
    kernel-only mask. The reference fine-tuning uses 0.

Layer-wise lr decay (`config.layer_decay` < 1, BEiT/MAE fine-tuning): the final update of
each parameter is multiplied by decay^(L + 1 - depth) (training/layer_decay.py: block i of
L gets decay^(L - i), the embeddings decay^(L + 1), the head 1), which scales its lr and
its decoupled weight decay together. The multipliers are built from the update tree when
the step is traced (its paths and shapes are the params'), so the optimizer needs no
parameter shapes up front; a scanned model's stacked blocks get a per-layer array, and
under FSDP the constant multipliers broadcast against the sharded updates.
"""

import jax
import optax

from vit_jax.models import params as names
from vit_jax.training import layer_decay as layer_decay_lib

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("cosine", "linear")


def _steps(config) -> tuple[int, int]:
  total, warmup = int(config.total_steps), int(config.warmup_steps)
  if total <= 0:
    raise ValueError(f"config.total_steps must be positive, got {total}.")
  if not 0 <= warmup <= total:
    raise ValueError(f"config.warmup_steps={warmup} must be in [0, total_steps={total}].")
  return total, warmup


def make_schedule(config) -> optax.Schedule:
  """Linear warmup from 0 to `config.lr` over `warmup_steps`, then `schedule` decay to 0.

  Reads config.lr, config.total_steps, config.warmup_steps, config.schedule
  ('cosine' | 'linear').
  """
  name = config.schedule
  if name not in SCHEDULES:
    raise ValueError(f"Unknown config.schedule {name!r}; choose one of {SCHEDULES}.")
  total, warmup = _steps(config)
  lr = float(config.lr)
  if name == "cosine":
    decay = optax.cosine_decay_schedule(lr, decay_steps=max(total - warmup, 1))
  else:
    decay = optax.linear_schedule(lr, 0.0, transition_steps=max(total - warmup, 1))
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


def decay_mask(params):
  """True for the parameters weight decay applies to: kernels only."""
  return jax.tree_util.tree_map_with_path(lambda path, _: names.key_name(path[-1]) == "kernel",
                                          params)


def _base_optimizer(config, schedule) -> optax.GradientTransformation:
  name = config.optimizer
  wd = float(config.weight_decay or 0.0)
  if name == "adam":
    return optax.adamw(schedule, b1=config.b1, b2=config.b2,
                       weight_decay=wd, mask=decay_mask)
  if name == "sgd":
    momentum = config.momentum or None
    sgd = optax.sgd(schedule, momentum=momentum)
    if wd:
      return optax.chain(optax.add_decayed_weights(wd, mask=decay_mask), sgd)
    return sgd
  raise ValueError(f"Unknown config.optimizer {name!r}; choose one of {OPTIMIZERS}.")


def scale_by_layer_decay(decay: float, num_layers: int) -> optax.GradientTransformation:
  """Stateless: each update leaf times its layer-decay multiplier (see the module doc).

  The multipliers come from `layer_decay.layer_decay_multipliers` on the updates' own
  tree at trace time (constants in the compiled step).
  """
  decay = layer_decay_lib.check_layer_decay(decay)

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    multipliers = layer_decay_lib.layer_decay_multipliers(updates, decay, num_layers)
    return layer_decay_lib.scale_by_layer_decay(multipliers).update(updates, state, params)

  return optax.GradientTransformation(init_fn, update_fn)


def make_optimizer(config) -> optax.GradientTransformation:
  """Gradient clipping (if `grad_clip_norm`), SGD-momentum or AdamW, then layer decay.

  Reads config.optimizer, config.lr (via the schedule), config.momentum, config.b1,
  config.b2, config.weight_decay, config.grad_clip_norm, config.layer_decay (1 = off, and
  then the optimizer and its state are exactly as without it) and config.model.num_layers.
  """
  base = _base_optimizer(config, make_schedule(config))
  decay = layer_decay_lib.check_layer_decay(config.layer_decay)
  if decay != 1.0:
    base = optax.chain(base, scale_by_layer_decay(decay, int(config.model.num_layers)))
  clip = config.grad_clip_norm
  if clip:
    if clip < 0:
      raise ValueError(f"config.grad_clip_norm must be >= 0 (0 or None = off), got {clip}.")
    return optax.chain(optax.clip_by_global_norm(float(clip)), base)
  return base
