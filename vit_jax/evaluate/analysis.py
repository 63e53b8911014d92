"""Analyse a trained model: attention maps, attention distance, position embeddings, few-shot.

`analyse(workdir, out)` (the command is `python -m vit_jax.analyze --workdir=WORKDIR`) reads
a trainer workdir (its `config.json` and final `params/`) and writes
`attention_maps.png`, `attention_distance.png`, `posemb_similarity.png` (learned 1-D
embeddings only), `embedding_filters.png` (Figure 7 left: principal components of the
patch-embedding filters; not for hybrids, whose embedding sees ResNet channels) and
`analysis.json` with the numbers, including few-shot linear-probe accuracies on frozen
pre-logits features and the filters' explained-variance ratios. The workdir and `out` may
be gs:// paths (read and written through etils.epath; the PNGs are drawn locally, then
uploaded).
"""

import contextlib
import json
import os
import pathlib
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import checkpoints, data, models, storage
from vit_jax.data import sources as data_sources
from vit_jax.evaluate import attention, fewshot, filters, plots, posemb
from vit_jax.models import params as names
from vit_jax.training import workdir as workdir_lib


def load_workdir(workdir):
  """(config, model, params) of a finished trainer workdir (local or gs://)."""
  storage.check_reachable(workdir, "workdir")
  config = workdir_lib.read_config(workdir)
  params = checkpoints.read_params(workdir_lib.file(workdir, workdir_lib.PARAMS_DIR))
  num_classes = params[names.HEAD]["bias"].shape[0]
  model = models.from_config(config.model, num_classes)
  return config, model, params


def _images_and_labels(config, split, limit):
  """Up to `limit` eval-preprocessed (unmasked) images [n, h, w, 3] in [-1, 1] and labels."""
  images, labels = [], []
  iterator = data.make_eval_iterator(config, split=split, process_index=0, process_count=1)
  try:
    for batch in iterator:
      keep = np.asarray(batch["mask"], bool)
      images.append(np.asarray(data.normalize_images(batch["image"][keep])))
      labels.append(np.asarray(batch["label"][keep]))
      if sum(len(x) for x in labels) >= limit:
        break
  finally:
    getattr(iterator, "close", lambda: None)()
  return np.concatenate(images)[:limit], np.concatenate(labels)[:limit]


def features(model, params, images, batch_size=256):
  """Frozen pre-logits features [n, dim]."""
  body = model.clone(num_classes=None)
  apply = jax.jit(lambda x: body.apply({"params": params}, x))
  return np.concatenate([np.asarray(apply(jnp.asarray(images[i:i + batch_size])))
                         for i in range(0, len(images), batch_size)])


def embedding_filters(params, path, num: int = 28):
  """Figure 7 (left) for a plain ViT: PNG of the top principal components of the
  patch-embedding filters, and their explained-variance ratios; None for a hybrid (its
  embedding kernel filters ResNet channels, not RGB pixels)."""
  flat = names.flatten(params)
  kernel = np.asarray(flat[f"{names.EMBEDDING}/kernel"])
  if any(k.startswith("conv_root/") for k in flat) or kernel.shape[2] != 3:
    return None
  num = min(num, kernel.shape[-1], int(np.prod(kernel.shape[:3])))
  components, ratio = filters.embedding_filter_components(kernel, num)
  return {"explained_variance_ratio": ratio.tolist(),
          "plot": filters.plot_embedding_filters(components, path)}


@contextlib.contextmanager
def _local_dir_for(out):
  """A local directory whose files end up in `out`: `out` itself when it is local, else
  a temporary directory copied to `out` (e.g. gs://) at the end."""
  target = storage.check_reachable(out, "analysis output")
  if not storage.is_remote(target):
    target.mkdir(parents=True, exist_ok=True)
    yield os.fspath(target)
    return
  with tempfile.TemporaryDirectory(prefix="vit_jax_analysis_") as local:
    yield local
    for f in sorted(pathlib.Path(local).iterdir()):
      (target / f.name).write_bytes(f.read_bytes())


def analyse(workdir, out, num_images=6, shots=(1, 5, 10), fewshot_examples=2000) -> dict:
  config, model, params = load_workdir(workdir)
  storage.check_dataset_dir(data_sources.data_dir_of(config))
  with _local_dir_for(out) as local:
    result = _analyse(config, model, params, local, num_images, shots, fewshot_examples)
  out_path = storage.as_path(out)
  result["plots"] = [os.fspath(out_path / os.path.basename(p)) for p in result["plots"]]
  (out_path / "analysis.json").write_text(json.dumps(result, indent=2))
  return result


def _analyse(config, model, params, out, num_images, shots, fewshot_examples) -> dict:
  """The numbers and plots (PNGs written to the local directory `out`)."""
  images, labels = _images_and_labels(config, config.eval_split, fewshot_examples)
  grid = (images.shape[1] // model.total_stride, images.shape[2] // model.total_stride)
  prefix = 1 if model.classifier in ("token", "token_unpooled") else 0
  weights = attention.collect_attention(model, {"params": params}, images[:num_images])
  distance = attention.mean_attention_distance(weights, grid, model.total_stride, prefix)
  distance = distance.mean(axis=1)  # Over the batch: [layers, heads].
  maps = attention.upsample_map(attention.attention_rollout(weights, prefix), grid,
                                images.shape[1:3])
  result = {"attention_distance": distance.tolist(), "plots": [
      plots.plot_attention_maps(images[:num_images], maps,
                                os.path.join(out, "attention_maps.png"), labels[:num_images]),
      plots.plot_attention_distance(distance, os.path.join(out, "attention_distance.png"))]}
  pe = names.flatten(params).get(names.POSEMB)  # None for sincos2d, relative, none.
  if pe is not None:
    result["plots"].append(plots.plot_posemb_similarity(
        posemb.posemb_similarity(pe, grid, prefix), os.path.join(out, "posemb_similarity.png")))

  embedding = embedding_filters(params, os.path.join(out, "embedding_filters.png"))
  if embedding is not None:
    result["embedding_filters"] = embedding
    result["plots"].append(embedding["plot"])

  train_images, train_labels = _images_and_labels(config, config.train_split, fewshot_examples)
  train_feats, test_feats = features(model, params, train_images), features(model, params, images)
  num_classes = int(params[names.HEAD]["bias"].shape[0])
  result["fewshot"] = {}
  for n in shots:
    try:
      result["fewshot"][f"{n}shot"] = fewshot.fewshot_accuracy(
          train_feats, train_labels, test_feats, labels, shots=int(n), num_classes=num_classes)
    except ValueError as e:  # Too few examples of some class for this many shots.
      result["fewshot"][f"{n}shot"] = str(e)
  return result
