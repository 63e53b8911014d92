"""The interface every objective implements; the training loop knows no other."""

from typing import Callable


class Objective:
  """What a run learns. Subclasses fill in every method.

  A batch is {'image': uint8 [batch, h, w, c], 'label': int32 [batch], 'mask': bool
  [batch] (eval only)}; images are scaled to [-1, 1] by the objective.
  """
  name: str = ""

  def problems(self, config) -> list[str]:
    """What in `config` this objective cannot run with, one line per field ([] if fine)."""
    del config
    return []

  def create_model(self, config, num_classes: int):
    """The Flax module trained (it has `num_channels` and `num_classes`)."""
    raise NotImplementedError

  def batch_loss(self, config, model) -> Callable:
    """`(params, batch, rng) -> (mean loss, metrics dict)` for the train step."""
    raise NotImplementedError

  def eval_sums(self, config, model) -> Callable:
    """`(params, batch, mask) -> {'correct', 'correct_top5', 'loss_sum', 'count'}` sums."""
    raise NotImplementedError

  def exported_params(self, params):
    """The parameters written to the workdir's `params/` (what fine-tuning starts from)."""
    return params

  def describe(self, num_classes: int) -> str:
    """A few words for the start-up line, e.g. '10 classes'."""
    raise NotImplementedError
