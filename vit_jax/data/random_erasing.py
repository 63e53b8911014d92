"""Random erasing (Zhong et al. 2020), as DeiT trains with it (timm's RandomErasing).

With probability `prob` one rectangle of the [height, width, 3] uint8 crop is replaced by
noise. The rectangle is drawn as timm draws it: up to 10 attempts of an area fraction
uniform in [min_area, max_area] and an aspect ratio log-uniform in [min_aspect,
1 / min_aspect]; the first that fits inside the image is used (none fits: unchanged).

Fill: timm's 'pixel' mode draws each value from N(0, 1) in its normalised space. Here the
image is still uint8 and normalises to [-1, 1] (`images.normalize_images`), so N(0, 1)
there is round(127.5 * (z + 1)), clipped to [0, 255]: the same noise, cut at +-1.
"""

import math

import numpy as np

MIN_AREA, MAX_AREA, MIN_ASPECT, ATTEMPTS = 0.02, 1 / 3, 0.3, 10


def erase_box(height: int, width: int, rng: np.random.Generator):
  """(top, left, box_height, box_width) of the rectangle to erase, or None."""
  log_aspect = (math.log(MIN_ASPECT), math.log(1 / MIN_ASPECT))
  for _ in range(ATTEMPTS):
    area = rng.uniform(MIN_AREA, MAX_AREA) * height * width
    aspect = math.exp(rng.uniform(*log_aspect))
    box_h = int(round(math.sqrt(area * aspect)))
    box_w = int(round(math.sqrt(area / aspect)))
    if 0 < box_h < height and 0 < box_w < width:
      top = int(rng.integers(0, height - box_h + 1))
      left = int(rng.integers(0, width - box_w + 1))
      return top, left, box_h, box_w
  return None


def random_erase(image: np.ndarray, rng: np.random.Generator, prob: float) -> np.ndarray:
  """`image` uint8 [height, width, 3] with one rectangle erased, with probability `prob`.

  Draws nothing from `rng` when prob is 0, so an erasing-free pipeline keeps its batches.
  """
  if prob <= 0 or rng.uniform() >= prob:
    return image
  height, width = image.shape[:2]
  box = erase_box(height, width, rng)
  if box is None:
    return image
  top, left, box_h, box_w = box
  noise = rng.standard_normal((box_h, box_w, image.shape[2]))
  out = image.copy()
  out[top:top + box_h, left:left + box_w] = np.clip(np.round(127.5 * (noise + 1)), 0, 255)
  return out
