"""A self-contained serving artifact: `jax.export` of the whole classifier, and its loader.

DIR/model.jaxexport  the serialized program (StableHLO): `(params, images) -> probs`,
                     images uint8 [batch, size, size, 3] with a symbolic batch dimension;
                     the [-1, 1] scaling, the model and the softmax/sigmoid are inside
DIR/params.npz       its parameters, flat '/'-joined names (plain arrays, no pickle)
DIR/serving.json     image size, class names, model name, output, resize mode, platforms

The parameters are an input of the program rather than constants baked into it, so the
program stays small whatever the model (serialized constants hit the 2 GB flatbuffer
limit for ViT-H). Loading needs jax and numpy only, no Flax and no model code; resizing
images of other sizes to the exported resolution is done on the host as in the eval
pipeline (`inference.preprocess`).
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax import export as jax_export

from vit_jax.inference import labels as labels_lib
from vit_jax.inference.errors import LoadError
from vit_jax.inference.predictor import Predictor

SERVING_JSON = "serving.json"
PROGRAM_FILE = "model.jaxexport"
PARAMS_FILE = "params.npz"
FORMAT = "vit_jax.export/1"
PLATFORMS = ("cpu", "cuda")


def export(predictor: Predictor, directory: str, *, platforms=PLATFORMS) -> dict:
  """Writes `predictor` (built from a Flax model) as an artifact in `directory`.

  Returns the metadata written to serving.json. A directory that holds anything other
  than a previous artifact is refused.
  """
  if predictor.model is None:
    raise LoadError(f"{predictor.source} is already an export artifact; copy the "
                    "directory instead of exporting it again.")
  _check_output_dir(directory)
  params = {k: np.asarray(v) for k, v in predictor.apply_params.items()}
  batch, = jax_export.symbolic_shape("batch")
  size = predictor.image_size
  exported = jax_export.export(jax.jit(predictor.apply_fn), platforms=tuple(platforms))(
      {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in params.items()},
      jax.ShapeDtypeStruct((batch, size, size, 3), jnp.uint8))
  metadata = {
      "format": FORMAT, "model": predictor.model_name, "image_size": size,
      "num_classes": predictor.num_classes, "class_names": list(predictor.class_names),
      "output": predictor.output, "eval_mode": predictor.eval_mode,
      "input": f"uint8 [batch, {size}, {size}, 3], RGB 0..255",
      "platforms": list(exported.platforms), "source": predictor.source,
      "jax_version": jax.__version__,
  }
  os.makedirs(directory, exist_ok=True)
  _write_atomic(os.path.join(directory, PROGRAM_FILE), exported.serialize())
  with open(os.path.join(directory, PARAMS_FILE + ".partial"), "wb") as f:
    np.savez(f, **params)
  os.replace(os.path.join(directory, PARAMS_FILE + ".partial"),
             os.path.join(directory, PARAMS_FILE))
  # serving.json last: a directory with it is complete.
  _write_atomic(os.path.join(directory, SERVING_JSON),
                (json.dumps(metadata, indent=2) + "\n").encode())
  return metadata


def _check_output_dir(directory: str) -> None:
  if os.path.exists(directory) and not os.path.isdir(directory):
    raise LoadError(f"--output={directory} is a file; give a directory for the artifact.")
  if os.path.isdir(directory):
    others = sorted(set(os.listdir(directory)) - {SERVING_JSON, PROGRAM_FILE, PARAMS_FILE})
    if others:
      raise LoadError(f"--output={directory} already holds other files ({', '.join(others[:5])}"
                      "); give a new or empty directory.")


def _write_atomic(path: str, data: bytes) -> None:
  with open(path + ".partial", "wb") as f:
    f.write(data)
  os.replace(path + ".partial", path)


def read_metadata(directory: str) -> dict:
  path = os.path.join(directory, SERVING_JSON)
  try:
    with open(path, encoding="utf-8") as f:
      metadata = json.load(f)
  except (OSError, ValueError) as e:
    raise LoadError(f"Cannot read {path}: {e}. Export the checkpoint again.") from None
  if metadata.get("format") != FORMAT:
    raise LoadError(f"{path} has format {metadata.get('format')!r}, not {FORMAT!r}: it was "
                    "written by another version; export the checkpoint again.")
  return metadata


def load_exported(directory: str, *, labels=None, batch_size: int = 32) -> Predictor:
  """A Predictor running the artifact's serialized program (no Flax model is built)."""
  metadata = read_metadata(directory)
  try:
    with open(os.path.join(directory, PROGRAM_FILE), "rb") as f:
      exported = jax_export.deserialize(bytearray(f.read()))
    with np.load(os.path.join(directory, PARAMS_FILE), allow_pickle=False) as npz:
      params = {k: npz[k] for k in npz.files}
  except (OSError, ValueError) as e:
    raise LoadError(f"Export artifact {directory} is incomplete or damaged "
                    f"({type(e).__name__}: {e}); export the checkpoint again.") from None
  platform = jax.default_backend()
  if platform not in exported.platforms:
    raise LoadError(f"Export artifact {directory} was made for {exported.platforms}, and "
                    f"this machine runs JAX on {platform!r}; export it again with that "
                    "platform.")
  num_classes = int(metadata["num_classes"])
  class_names = (labels_lib.read_labels(labels, num_classes) if labels is not None
                 else tuple(metadata["class_names"]))
  return Predictor(
      apply_fn=exported.call, apply_params=params, image_size=int(metadata["image_size"]),
      class_names=class_names, model_name=metadata["model"], output=metadata["output"],
      eval_mode=metadata["eval_mode"], batch_size=batch_size,
      source=f"export {directory}")
