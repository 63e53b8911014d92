"""What a run learns, chosen by `config.objective`.

Each objective (base.Objective) provides its model, batch loss, evaluation sums and the
parameters it exports; the loop has no objective-specific branch. A new objective (e.g.
distillation) is one new module plus one line in OBJECTIVES.
"""

from vit_jax.training import optim
from vit_jax.training import step
from vit_jax.training.objectives.base import Objective
from vit_jax.training.objectives.classification import Classification
from vit_jax.training.objectives.mpp import MaskedPatchPrediction

OBJECTIVES = {o.name: o for o in (Classification(), MaskedPatchPrediction())}


def get(config) -> Objective:
  """The objective `config.objective` names; ValueError listing the known ones."""
  if config.objective not in OBJECTIVES:
    raise ValueError(f"Unknown config.objective {config.objective!r}; choose one of "
                     f"{sorted(OBJECTIVES)}.")
  return OBJECTIVES[config.objective]


def make_train_step(objective: Objective, config, model, mesh, state_shardings):
  """`step.make_train_step` with the objective's loss, the config's optimizer and EMA."""
  return step.make_train_step(
      batch_loss=objective.batch_loss(config, model), tx=optim.make_optimizer(config),
      schedule=optim.make_schedule(config), accum_steps=int(config.accum_steps), mesh=mesh,
      state_shardings=state_shardings, ema_decay=float(config.ema_decay))


def make_eval_step(objective: Objective, config, model, mesh, state_shardings):
  """`step.make_eval_step` with the objective's evaluation sums."""
  return step.make_eval_step(batch_sums=objective.eval_sums(config, model), mesh=mesh,
                             state_shardings=state_shardings)


__all__ = ["OBJECTIVES", "Objective", "get", "make_eval_step", "make_train_step"]
