"""Builds the second ablation dataset offline: 32x32 grey crops of scikit-image's bundled photos.

  pip install scikit-image && python docs/ablations/make_skimage_crops.py [ROOT]

Ten photographs that ship inside the scikit-image wheel (`skimage.data`; nothing is
downloaded) are each one class: brick, grass, gravel (textures), camera, moon, astronaut,
coffee, chelsea (a cat), coins, ihc (a stained tissue slide). Each is converted to grey
and resized so its short side is 256 px; training crops come from the top 70 % of the
rows, test crops from the bottom 30 %, so no test pixel was seen in training. The task
is "which photo is this crop from", texture and local structure, not object recognition.
Written as an image folder ROOT/{train,test}/<class>/*.png (config.dataset=ROOT); the
default ROOT is ./data/skimage_crops. Deterministic (seed 0).
"""

import os
import sys

import numpy as np
from PIL import Image
import skimage.data

CLASSES = ("brick", "grass", "gravel", "camera", "moon", "astronaut", "coffee", "chelsea",
           "coins", "ihc")
LOADERS = {"ihc": "immunohistochemistry"}  # Class name -> skimage.data function.
CROP, SHORT_SIDE, TRAIN_FRACTION = 32, 256, 0.7
PER_CLASS = {"train": 150, "test": 40}


def grey_photo(name: str) -> np.ndarray:
  """The photo as uint8 grey [h, w], short side SHORT_SIDE."""
  image = np.asarray(getattr(skimage.data, LOADERS.get(name, name))())
  if image.ndim == 3:
    image = Image.fromarray(image[..., :3]).convert("L")
  else:
    image = Image.fromarray(image.astype(np.uint8))
  scale = SHORT_SIDE / min(image.size)
  size = (round(image.size[0] * scale), round(image.size[1] * scale))
  return np.asarray(image.resize(size, Image.BICUBIC))


def crops(image, rows, count, rng):
  """`count` random CROP x CROP crops whose rows lie in rows = (first, last)."""
  top = rng.integers(rows[0], rows[1] - CROP + 1, size=count)
  left = rng.integers(0, image.shape[1] - CROP + 1, size=count)
  return [image[t:t + CROP, l:l + CROP] for t, l in zip(top, left)]


def main(root: str) -> None:
  rng = np.random.default_rng(0)
  for name in CLASSES:
    image = grey_photo(name)
    split_row = int(TRAIN_FRACTION * image.shape[0])
    regions = {"train": (0, split_row), "test": (split_row, image.shape[0])}
    for split, count in PER_CLASS.items():
      folder = os.path.join(root, split, name)
      os.makedirs(folder, exist_ok=True)
      for i, crop in enumerate(crops(image, regions[split], count, rng)):
        Image.fromarray(np.stack([crop] * 3, axis=-1)).save(os.path.join(folder, f"{i:04d}.png"))
  print(f"{root}: {len(CLASSES)} classes, {PER_CLASS['train']} train and "
        f"{PER_CLASS['test']} test crops each")


if __name__ == "__main__":
  main(sys.argv[1] if len(sys.argv) > 1 else os.path.join("data", "skimage_crops"))
