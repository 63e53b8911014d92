"""A diverged run: training metrics checked for NaN/inf before anything uses them."""

import jax
import numpy as np


class TrainingDivergedError(RuntimeError):
  """The loss (or gradient norm) became NaN or infinite."""


class MetricsBuffer:
  """Training metrics kept on the device until a log/check point, then checked for NaN."""

  def __init__(self):
    self._pending = []  # (step, device metrics)
    self._host = []  # host metrics since the last report

  def add(self, step, metrics):
    self._pending.append((step, metrics))

  def check(self):
    """Fetches pending metrics; raises TrainingDivergedError at the first non-finite step."""
    fetched = jax.device_get(self._pending)
    self._pending = []
    for step, metrics in fetched:
      bad = {k: float(v) for k, v in metrics.items()
             if k in ("loss", "grad_norm") and not np.isfinite(v)}
      if bad:
        raise TrainingDivergedError(step, bad, float(metrics["learning_rate"]))
      self._host.append({k: float(v) for k, v in metrics.items()})

  def mean_and_reset(self) -> dict:
    keys = self._host[0].keys() if self._host else ()
    mean = {k: float(np.mean([m[k] for m in self._host])) for k in keys}
    # The learning rate of the last step, not the mean over the interval.
    if self._host and "learning_rate" in self._host[-1]:
      mean["learning_rate"] = self._host[-1]["learning_rate"]
    self._host = []
    return mean


def diverged_error(err: TrainingDivergedError, ckpt) -> TrainingDivergedError:
  step, bad, lr = err.args
  last = ckpt.latest_step()
  kept = (f"The last good checkpoint is step {last} in {ckpt.directory}; rerunning resumes "
          "from it." if last is not None else "No checkpoint was saved before it.")
  values = ", ".join(f"{k}={v}" for k, v in bad.items())
  return TrainingDivergedError(
      f"Training diverged at step {step}: {values} (learning rate {lr:.3g}). Stopped. {kept} "
      "Lower config.lr, raise config.warmup_steps or keep config.grad_clip_norm on.")
