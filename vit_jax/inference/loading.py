"""`load(path)`: what a path is (workdir, Orbax params, .npz, export artifact) -> a Predictor.

Kinds, decided from what is on disk:
  workdir  a directory with config.json (a `python -m vit_jax.main` run)
  export   a directory with serving.json (`python -m vit_jax.export` output)
  orbax    a directory Orbax wrote: `save_params` output (_METADATA / manifest.ocdbt),
           a TrainCheckpointer directory (numbered steps) or one step (state/)
  npz      a file ending in .npz, or any zip file (what np.savez writes)
This module imports no Flax: an export artifact loads without the model code.
"""

import os
import re

from vit_jax.inference import exporting
from vit_jax.inference.errors import LoadError
from vit_jax.training import workdir as workdir_lib

KINDS = ("workdir", "export", "orbax", "npz")
_ORBAX_MARKERS = ("_METADATA", "_CHECKPOINT_METADATA", "manifest.ocdbt", "state")


def _is_orbax(path: str) -> bool:
  entries = os.listdir(path)
  return (any(m in entries for m in _ORBAX_MARKERS)
          or any(re.fullmatch(r"\d+", e) and os.path.isdir(os.path.join(path, e))
                 for e in entries))


def detect_kind(path: str) -> str:
  """One of KINDS; LoadError naming the accepted kinds when `path` is none of them."""
  if not os.path.exists(path):
    raise LoadError(f"{path} does not exist; give a trainer workdir, an Orbax "
                    "params directory, a .npz file or a vit_jax.export directory.")
  if os.path.isdir(path):
    if os.path.isfile(os.path.join(path, exporting.SERVING_JSON)):
      return "export"
    if os.path.isfile(workdir_lib.file(path, workdir_lib.CONFIG_JSON)):
      return "workdir"
    if _is_orbax(path):
      return "orbax"
  else:
    if path.lower().endswith(".npz"):
      return "npz"
    try:
      with open(path, "rb") as f:
        if f.read(4) == b"PK\x03\x04":
          return "npz"
    except OSError:
      pass
  what = "directory" if os.path.isdir(path) else "file"
  raise LoadError(
      f"{path} is a {what} of none of the accepted kinds: a trainer workdir (has "
      f"{workdir_lib.CONFIG_JSON}), an export artifact (has {exporting.SERVING_JSON}), an "
      "Orbax params directory (has _METADATA or numbered step directories) or a .npz "
      "file.")


def load(path, model=None, labels=None, *, batch_size: int = 32, output=None):
  """A ready `Predictor` for a checkpoint; `predictor(images)` -> probabilities.

  Args:
    path: a trainer workdir, an Orbax params directory, a published/saved `.npz`, or a
      `python -m vit_jax.export` directory (runs the serialized program, no Flax model).
    model: the model of a `.npz` / Orbax directory: a registry name ('ViT-B_16') or a model
      ConfigDict; not needed for a workdir, an export, or Orbax params inside a workdir.
      The resolution is read from the checkpoint's position embeddings.
    labels: a text file with one class name per line (overrides the recorded names).
      Without it a workdir uses its labels.txt or its dataset's metadata, an export its
      recorded names, anything else the class indices ('0', '1', ...; see `.notes`).
    batch_size: images per compiled batch; the last batch is padded, so one compile.
    output: 'softmax' or 'sigmoid'; default: 'sigmoid' for runs trained with
      config.loss='sigmoid_xent', else 'softmax' (an export keeps what it was made with).
  Raises LoadError (a ValueError) with what to change.
  """
  path = os.fspath(path)
  kind = detect_kind(path)
  if kind == "export":
    if model is not None:
      raise LoadError(f"{path} is an export artifact: it carries its model; omit --model.")
    if output is not None:
      raise LoadError(f"{path} is an export artifact made with output "
                      f"{exporting.read_metadata(path).get('output')!r}; omit output.")
    return exporting.load_exported(path, labels=labels, batch_size=batch_size)
  from vit_jax.inference import from_checkpoint  # pylint: disable=g-import-not-at-top
  if kind == "workdir":
    return from_checkpoint.from_workdir(path, model=model, labels=labels,
                                        batch_size=batch_size, output=output)
  return from_checkpoint.from_params(path, kind, model=model, labels=labels,
                                     batch_size=batch_size, output=output)
