"""Checkpoints: published `.npz` files, Orbax directories, and fine-tuning loads.

- `load_npz` / `save_npz` (npz.py): the flat files of Google vit_jax and big_vision.
- `save_params` / `restore_params` / `TrainCheckpointer` (orbax_io.py): Orbax directories
  of parameters, and of whole train states with the data iterator's state.
- `read_params` / `load_pretrained` (pretrained.py): any of those adapted to a new model.
"""

from vit_jax.checkpoints.arrays import place_like, to_host
from vit_jax.checkpoints.errors import CheckpointError
from vit_jax.checkpoints.npz import load_npz, normalize_npz, read_npz, save_npz
from vit_jax.checkpoints.orbax_io import TrainCheckpointer, restore_params, save_params
from vit_jax.checkpoints.pretrained import load_pretrained, read_params

__all__ = ["CheckpointError", "TrainCheckpointer", "load_npz", "load_pretrained",
           "normalize_npz", "place_like", "read_npz", "read_params", "restore_params",
           "save_npz", "save_params", "to_host"]
