"""Host-side preprocessing: any images -> uint8 [batch, size, size, 3], as the eval pipeline.

The trainer's eval pipeline (data/pipeline.py `_EvalMap`) decodes each image to RGB uint8,
applies `data.images.eval_transform(img, crop, config.pp.eval_mode)` and batches the uint8
results; the model step then scales them to [-1, 1] (`normalize_images`). The functions
here produce exactly those uint8 batches, so a predictor sees what the trainer's eval saw.
"""

import os

import numpy as np

from vit_jax.data import images as images_lib


def to_rgb_uint8(image, what: str = "image") -> np.ndarray:
  """One image as RGB uint8 [H, W, 3].

  image: uint8 (0..255) or float (0..1) of shape [H, W] or [H, W, 1] (grayscale, repeated
  to three channels, as decoding does), [H, W, 3] (RGB) or [H, W, 4] (alpha dropped).
  Floats are rounded to uint8 because the trainer only ever saw uint8 pixels; a float
  image outside [0, 1] (0..255 floats, or already normalised to [-1, 1]) is an error.
  """
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[..., None]
  if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
    raise ValueError(f"{what} has shape {image.shape}; expected [H, W, 3] (RGB), [H, W] or "
                     "[H, W, 1] (grayscale) or [H, W, 4] (RGBA).")
  if min(image.shape[:2]) < 1:
    raise ValueError(f"{what} has shape {image.shape}: it holds no pixels.")
  if image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  image = image[..., :3]
  if image.dtype == np.uint8:
    return image
  if np.issubdtype(image.dtype, np.floating):
    low, high = float(np.min(image)), float(np.max(image))
    if low < -1e-6 or high > 1 + 1e-6 or not np.isfinite([low, high]).all():
      raise ValueError(f"{what} is {image.dtype} with values in [{low:g}, {high:g}]; float "
                       "images must be in [0, 1] (pass 0..255 pixels as uint8).")
    return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)
  raise ValueError(f"{what} has dtype {image.dtype}; pass uint8 (0..255) or float (0..1).")


def as_image_list(images) -> list:
  """A list of images from: a batch [n, H, W, C] or [n, H, W] (grayscale, when the last
  axis is not 1, 3 or 4), one image [H, W, C] or [H, W], or a sequence of images."""
  if isinstance(images, (list, tuple)):
    return list(images)
  array = np.asarray(images)
  if array.ndim == 4:
    return list(array)
  if array.ndim == 3 and array.shape[-1] not in (1, 3, 4):
    return list(array)  # [n, H, W]: a batch of grayscale images.
  if array.ndim in (2, 3):
    return [array]
  raise ValueError(f"images has shape {array.shape}; pass [n, H, W, C], one [H, W, C] "
                   "image or a list of images of any sizes.")


def resize_batch(images, size: int, mode: str = "resize") -> np.ndarray:
  """Images of any sizes -> uint8 [n, size, size, 3], resized like the eval pipeline."""
  out = [images_lib.eval_transform(to_rgb_uint8(img, f"image {i}"), size, mode)
         for i, img in enumerate(as_image_list(images))]
  if not out:
    return np.zeros((0, size, size, 3), np.uint8)
  return np.stack(out)


class ImageReadError(ValueError):
  """An image file that cannot be used; the message starts with its path."""


def read_image(path: str) -> np.ndarray:
  """An image file decoded as the pipeline decodes it: RGB uint8 [H, W, 3].

  Raises ImageReadError naming the file: missing, unreadable, empty (0 bytes) or not an
  image OpenCV or PIL can decode.
  """
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise ImageReadError(f"{path}: cannot read the file ({e.strerror or e}).") from None
  if not data:
    raise ImageReadError(f"{path}: the file is empty (0 bytes).")
  try:
    return images_lib.decode_image(data, path)
  except ValueError:
    raise ImageReadError(f"{path}: not a decodable image ({len(data)} bytes; readable "
                         "formats: JPEG, PNG, WebP, BMP, and what PIL opens).") from None


def find_images(path: str) -> list:
  """Image files under a directory (sorted, walked recursively, by extension)."""
  found = []
  for root, dirs, files in os.walk(path):
    dirs.sort()
    found.extend(os.path.join(root, name) for name in sorted(files)
                 if name.lower().endswith(images_lib.IMAGE_EXTENSIONS))
  return found
