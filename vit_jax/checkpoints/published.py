"""Names for the published ViT weights, resolved to their files in the bucket.

  i21k:ViT-B_16        ROOT/imagenet21k/ViT-B_16.npz  (the paper's ImageNet-21k file)
  i21k+i1k:ViT-B_16    ROOT/imagenet21k+imagenet2012/ViT-B_16.npz (fine-tuned, 384 px)
  augreg:B_16          ROOT/augreg/<best>.npz: of the AugReg ("How to train your ViT")
                       runs of that model pre-trained on ImageNet-21k (index.csv rows
                       with ds == 'i21k'), the one with the highest upstream final_val.
  augreg:B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0
                       ROOT/augreg/<that name>.npz (any filename or adapt_filename of
                       the index, without .npz).

ROOT is `config.pretrained_root` (gs://vit_models). ROOT/augreg/index.csv has one row per
(pre-training run, fine-tuning run); the columns read here are `filename` (the
pre-training file, without .npz; its part before the first '-' is the model, e.g. 'B_16'),
`ds` ('i1k', 'i21k' or 'i21k_30': the pre-training data) and `final_val` (upstream final
validation accuracy). Other columns (name, adapt_ds, adapt_filename, ...) are ignored.
"""

import csv
import io
import os
import re

from etils import epath

DEFAULT_ROOT = "gs://vit_models"
# scheme -> the folder under the root that holds its files.
FOLDERS = {"i21k": "imagenet21k", "i21k+i1k": "imagenet21k+imagenet2012",
           "augreg": "augreg"}
EXAMPLES = "i21k:ViT-B_16, i21k+i1k:ViT-B_16, augreg:B_16"
AUGREG_INDEX = "index.csv"
_LISTED = 20  # Names listed in an error at most.
_NAME = re.compile(r"^([A-Za-z0-9_+]+):([^/:]+)$")


class UnknownPublishedName(FileNotFoundError):
  """A published-weights name that resolves to no file; the message lists known ones."""


def is_name(text: str) -> bool:
  """True for 'scheme:model' (no '/', no '://'), e.g. 'i21k:ViT-B_16'."""
  return "://" not in text and _NAME.match(text) is not None


def _join(root: str, *parts: str) -> epath.Path:
  return epath.Path(root.rstrip("/")).joinpath(*parts)


def _npz_names(folder: epath.Path) -> list[str]:
  try:
    return sorted(p.name[:-len(".npz")] for p in folder.iterdir() if p.name.endswith(".npz"))
  except (FileNotFoundError, OSError):
    return []


def read_augreg_index(root: str = DEFAULT_ROOT) -> list[dict]:
  """The rows of ROOT/augreg/index.csv as dicts of strings."""
  index = _join(root, FOLDERS["augreg"], AUGREG_INDEX)
  if not index.exists():
    raise UnknownPublishedName(f"{index} not found: the AugReg index lists the published "
                               "AugReg runs (check config.pretrained_root).")
  rows = list(csv.DictReader(io.StringIO(index.read_text())))
  missing = {"filename", "ds", "final_val"} - set(rows[0] if rows else ())
  if missing:
    raise ValueError(f"{index} lacks the column(s) {sorted(missing)}.")
  return rows


def best_augreg_filename(model: str, root: str = DEFAULT_ROOT) -> str:
  """The ImageNet-21k AugReg file (no .npz) of `model` ('B_16') with the best final_val."""
  rows = read_augreg_index(root)
  model_of = lambda row: row["filename"].split("-")[0]
  candidates = [r for r in rows if model_of(r) == model and r["ds"] == "i21k"]
  if not candidates:
    known = sorted({model_of(r) for r in rows if r["ds"] == "i21k"})
    raise UnknownPublishedName(
        f"augreg:{model}: no ImageNet-21k AugReg run of {model!r} in "
        f"{_join(root, FOLDERS['augreg'], AUGREG_INDEX)}. Known models: {', '.join(known)} "
        "(or give a full file name, augreg:B_16-i21k-300ep-...).")
  return max(candidates, key=lambda r: float(r["final_val"]))["filename"]


def resolve(name: str, root: str = DEFAULT_ROOT) -> str:
  """The path of the file that a published name stands for (see the module docstring).

  Raises UnknownPublishedName (listing the known schemes, models or files) when the name
  does not resolve to an existing file.
  """
  match = _NAME.match(name) if is_name(name) else None
  scheme, model = match.groups() if match else (None, None)
  if scheme not in FOLDERS:
    raise UnknownPublishedName(
        f"{name!r} is not a published-weights name; known schemes: "
        + ", ".join(f"{s} ({FOLDERS[s]}/)" for s in FOLDERS) + f"; e.g. {EXAMPLES}.")
  folder = _join(root, FOLDERS[scheme])
  if scheme == "augreg" and "-" not in model:
    model = best_augreg_filename(model, root)
  path = folder / f"{model}.npz"
  if not path.exists():
    known = _npz_names(folder)
    listed = ", ".join(known[:_LISTED]) + (f", ... ({len(known) - _LISTED} more)"
                                           if len(known) > _LISTED else "")
    raise UnknownPublishedName(
        f"{name!r}: {path} does not exist. Known {scheme} names: "
        + (listed if known else f"none found in {folder} (check config.pretrained_root)")
        + ".")
  return os.fspath(path)
