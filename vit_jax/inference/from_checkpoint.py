"""Predictors built from the Flax model: a trainer workdir, Orbax params or a `.npz`.

The parameters are read with `checkpoints.read_params` (the same arrays whatever the
container), the model comes from the workdir's config or a registry name, and the
resolution from the checkpoint's position embeddings. The function that runs is
`classifier_fn`: uint8 images -> `normalize_images` -> the model in eval mode ->
probabilities, over a flat {'path/to/param': array} dict, the very function
`inference.export` serializes.
"""

import os

import jax
import ml_collections
import numpy as np

from vit_jax import checkpoints
from vit_jax import models
from vit_jax.data.images import normalize_images
from vit_jax.inference import labels as labels_lib
from vit_jax.inference.errors import LoadError
from vit_jax.inference.predictor import OUTPUTS, Predictor, probabilities
from vit_jax.models import params as names
from vit_jax.training import workdir as workdir_lib

_NO_HEAD = (
    "{what} has no classification head ('{head}/kernel' and '{head}/bias' are missing): "
    "it is an encoder, e.g. the parameters a masked-patch-prediction run exports or a "
    "model built with num_classes=None, so it cannot give class probabilities. Fine-tune "
    "it on labelled images first (python -m vit_jax.main --config.init_from={path}) and "
    "predict with that run's workdir.")


def classifier_fn(module, output: str):
  """`(flat params, uint8 [batch, h, w, 3]) -> float32 probabilities [batch, classes]`."""
  def apply(flat_params, images):
    logits = module.apply({"params": names.unflatten(flat_params)}, normalize_images(images),
                          train=False)
    if logits.ndim != 2:
      raise LoadError(f"The model gives outputs of shape {logits.shape}, not [batch, "
                      f"classes]: its classifier {module.classifier!r} is not pooled; use "
                      "'token', 'gap' or 'map'.")
    return probabilities(logits, output)
  return apply


def model_config_of(model) -> ml_collections.ConfigDict:
  """A registry name (e.g. 'ViT-B_16') or a model ConfigDict -> a fresh model config."""
  if isinstance(model, ml_collections.ConfigDict):
    return model.copy_and_resolve_references()
  try:
    return models.get_config(str(model))
  except ValueError as e:
    raise LoadError(str(e)) from None


def _fit_to_checkpoint(config, flat: dict) -> None:
  """Sets (in place) what the parameters decide: representation_size and image_size.

  The resolution is the posemb grid side times the model's stride (measured on the
  config's own resolution, so hybrids with their ResNet stem are covered too).
  """
  pre_logits = f"{names.PRE_LOGITS}/kernel"
  if pre_logits in flat and config.representation_size is None:
    config.representation_size = int(flat[pre_logits].shape[-1])
  if names.POSEMB not in flat:
    return
  prefix = 1 if names.CLS in flat else 0
  grid = int(flat[names.POSEMB].shape[1]) - prefix
  side = int(round(np.sqrt(grid)))
  shapes = models.param_shapes(models.from_config(config, 1), config.image_size)
  if side * side != grid or names.POSEMB not in shapes:
    return  # Not a square grid: the shape check below reports it.
  own_side = int(round(np.sqrt(shapes[names.POSEMB].shape[1] - prefix)))
  config.image_size = side * (config.image_size // max(own_side, 1))


def _check_fits(module, config, flat: dict, what: str) -> None:
  expected = models.param_shapes(module, config.image_size)
  missing = sorted(set(expected) - set(flat))
  unexpected = sorted(set(flat) - set(expected))
  shapes = [f"{k}: checkpoint {tuple(flat[k].shape)} vs model {tuple(expected[k].shape)}"
            for k in sorted(set(expected) & set(flat))
            if tuple(flat[k].shape) != tuple(expected[k].shape)]
  problems = [f"  {len(items)} {title}: " + "; ".join(items[:6])
              + (f"; ... ({len(items) - 6} more)" if len(items) > 6 else "")
              for title, items in (("missing from the checkpoint", missing),
                                   ("not in the model", unexpected),
                                   ("with other shapes", shapes)) if items]
  if problems:
    raise LoadError(f"{what} does not fit the model {config.name}:\n" + "\n".join(problems)
                    + "\nPass the model it was trained as (--model=NAME).")


def build(flat: dict, model_config, *, what: str, path: str, class_names=None,
          labels=None, output="softmax", eval_mode="resize", crop=None, batch_size=32,
          source="", notes=()) -> Predictor:
  """A Predictor over flat parameters and a model config (fitted to the parameters)."""
  if f"{names.HEAD}/kernel" not in flat:
    raise LoadError(_NO_HEAD.format(what=what, head=names.HEAD, path=path))
  if output not in OUTPUTS:
    raise LoadError(f"Unknown output {output!r}; choose one of {OUTPUTS}.")
  notes = list(notes)
  config = model_config_of(model_config)
  config.scan, config.remat_policy = False, "none"  # read_params gives per-layer params.
  config.dropout_rate = config.attention_dropout_rate = config.stochastic_depth = 0.0
  _fit_to_checkpoint(config, flat)
  num_classes = int(flat[f"{names.HEAD}/kernel"].shape[-1])
  module = models.from_config(config, num_classes)
  _check_fits(module, config, flat, what)
  if labels is not None:
    class_names = labels_lib.read_labels(labels, num_classes)
  elif class_names is None or len(class_names) != num_classes:
    if class_names is not None:
      notes.append(f"{len(class_names)} class names were found but the head has "
                   f"{num_classes} classes")
    notes.append("class names are unknown: classes are named by their index (pass "
                 "--labels=FILE, one name per line, to name them)")
    class_names = labels_lib.index_names(num_classes)
  flat = {k: np.asarray(v) for k, v in flat.items()}
  size = int(crop or config.image_size)
  apply = classifier_fn(module, output)
  jax.eval_shape(apply, flat, jax.ShapeDtypeStruct((1, size, size, 3), np.uint8))
  return Predictor(
      apply_fn=apply, apply_params=flat,
      image_size=size, class_names=class_names,
      model_name=config.name, output=output, eval_mode=eval_mode, batch_size=batch_size,
      source=source, notes=notes, model=module, params=names.unflatten(flat))


def _read_flat(path: str, what: str) -> dict:
  try:
    return names.flatten(checkpoints.read_params(path))
  except (checkpoints.CheckpointError, FileNotFoundError) as e:
    raise LoadError(f"{what}: {e}") from None


def _dataset_class_names(config, notes: list):
  """The class names of the workdir's dataset, or None (with a note) if it is not readable."""
  from vit_jax.data import errors as data_errors  # pylint: disable=g-import-not-at-top
  from vit_jax.data import sources  # pylint: disable=g-import-not-at-top
  try:
    return sources.resolve(config).class_names
  except (data_errors.DataError, OSError, ValueError) as e:
    notes.append(f"the run's dataset {config.dataset!r} cannot be read here "
                 f"({str(e).splitlines()[0][:160]})")
    return None


def _workdir_settings(path: str, config, labels, output, notes: list) -> dict:
  """What a workdir decides besides the weights: labels, output, resize."""
  class_names = None
  if labels is None:
    labels_file = workdir_lib.file(path, workdir_lib.LABELS_FILE)
    if os.path.isfile(labels_file):
      labels = labels_file
    else:
      class_names = _dataset_class_names(config, notes)
  if output is None:
    output = "sigmoid" if config.loss == "sigmoid_xent" else "softmax"
  return dict(class_names=class_names, labels=labels, output=output,
              eval_mode=config.pp.eval_mode, crop=config.pp.crop, notes=notes)


def _classifier_config(path: str, model):
  """The workdir's config, checked to be a classifier's (and to match `model` if given)."""
  config = workdir_lib.read_config(path)
  name = config.model.name
  if model is not None and model != name:
    raise LoadError(f"{path} is a trainer workdir of the model {name}; --model={model} "
                    "does not apply (omit --model: the workdir's config names the model).")
  if config.objective != "classification":
    raise LoadError(_NO_HEAD.format(what=f"Workdir {path} (config.objective="
                                    f"{config.objective!r})", head=names.HEAD, path=path))
  return config


def from_workdir(path: str, *, model=None, labels=None, batch_size=32,
                 output=None) -> Predictor:
  """A trainer workdir: its config, its final params (else latest checkpoint), its labels.

  Labels: `labels`, else WORKDIR/labels.txt (the trainer writes it), else the dataset's
  metadata when the dataset can be read here, else class indices (with a note).
  """
  config = _classifier_config(path, model)
  params_dir = workdir_lib.file(path, workdir_lib.PARAMS_DIR)
  ckpt_dir = workdir_lib.file(path, workdir_lib.CHECKPOINT_DIR)
  notes = []
  if os.path.isdir(params_dir):
    where = params_dir
  elif os.path.isdir(ckpt_dir):
    where = ckpt_dir
    notes.append(f"the run has not finished (no {workdir_lib.PARAMS_DIR}/): using its "
                 f"latest checkpoint in {ckpt_dir}")
  else:
    raise LoadError(f"Workdir {path} has neither {workdir_lib.PARAMS_DIR}/ nor "
                    f"{workdir_lib.CHECKPOINT_DIR}/: the run has not saved parameters yet.")
  flat = _read_flat(where, f"Workdir {path}")
  return build(flat, config.model, what=f"Workdir {path}", path=path, batch_size=batch_size,
               source=f"workdir {path} ({os.path.basename(where)}/)",
               **_workdir_settings(path, config, labels, output, notes))


def enclosing_workdir(path: str):
  """The workdir whose params/ or checkpoints/ `path` lies in, else None."""
  path = os.path.abspath(path)
  parent = path
  for _ in range(3):
    parent = os.path.dirname(parent)
    inside = os.path.relpath(path, parent).split(os.sep)[0]
    if (inside in (workdir_lib.PARAMS_DIR, workdir_lib.CHECKPOINT_DIR)
        and os.path.isfile(workdir_lib.file(parent, workdir_lib.CONFIG_JSON))):
      return parent
  return None


def from_params(path: str, kind: str, *, model=None, labels=None, batch_size=32,
                output=None) -> Predictor:
  """An Orbax params directory or a `.npz` file, with the model named by `model`.

  An Orbax directory inside a workdir (WORKDIR/params, WORKDIR/checkpoints[/STEP]) without
  `model` takes the workdir's config and labels.
  """
  what = f"{'Orbax directory' if kind == 'orbax' else '.npz file'} {path}"
  settings = dict(output=output or "softmax")
  if model is None:
    workdir = enclosing_workdir(path) if kind == "orbax" else None
    if workdir is None:
      raise LoadError(
          f"{what} holds only arrays: name its model with --model=NAME (model=NAME in "
          f"Python), one of {', '.join(models.MODEL_NAMES)}; or pass the run's workdir.")
    config = _classifier_config(workdir, None)
    model = config.model
    settings = _workdir_settings(workdir, config, labels, output, [])
  else:
    settings["labels"] = labels
  flat = _read_flat(path, what)
  return build(flat, model, what=what, path=path, batch_size=batch_size,
               source=f"{kind} {path}", **settings)
