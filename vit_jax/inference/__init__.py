"""From a checkpoint to answers: `load(path)` -> Predictor, `export(predictor, DIR)`.

  predictor = vit_jax.load("workdir/default")      # or Orbax params, a .npz + model=NAME,
  probs = predictor(images)                        # or an export directory
  predictor.top_k(probs, 5)

Commands: `python -m vit_jax.predict` and `python -m vit_jax.export`.
"""

from vit_jax.inference.errors import LoadError
from vit_jax.inference.exporting import export, load_exported
from vit_jax.inference.loading import KINDS, detect_kind, load
from vit_jax.inference.predictor import Predictor

__all__ = ["KINDS", "LoadError", "Predictor", "detect_kind", "export", "load",
           "load_exported"]
