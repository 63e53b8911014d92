"""Image decoding and the ViT fine-tuning preprocessing (uint8 in, uint8 out)."""

import io
import math

import cv2
import numpy as np

from vit_jax.data.errors import CorruptImageError

# Decoding runs in grain threads / worker processes; keep OpenCV itself
# single-threaded so it does not oversubscribe the cores.
cv2.setNumThreads(1)

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.webp', '.bmp')


def decode_image(data: bytes, path: str = '<bytes>') -> np.ndarray:
  """Decodes encoded image bytes to an RGB uint8 array [H, W, 3].

  OpenCV first (grayscale is expanded, alpha dropped, EXIF orientation applied,
  16-bit scaled to 8-bit); PIL as a fallback for formats OpenCV cannot read.
  Raises CorruptImageError naming `path` if neither can decode it.
  """
  buf = np.frombuffer(data, np.uint8)
  img = cv2.imdecode(buf, cv2.IMREAD_COLOR) if buf.size else None
  if img is not None:
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
  try:
    from PIL import Image  # pylint: disable=g-import-not-at-top
    with Image.open(io.BytesIO(data)) as pil:
      pil.load()
      if pil.mode in ('RGBA', 'LA', 'PA') or (
          pil.mode == 'P' and 'transparency' in pil.info):
        pil = pil.convert('RGBA')
      return np.asarray(pil.convert('RGB'), dtype=np.uint8)
  except Exception as e:  # pylint: disable=broad-except
    raise CorruptImageError(path, f'{type(e).__name__}: {e}') from None


def _resize(img: np.ndarray, width: int, height: int) -> np.ndarray:
  h, w = img.shape[:2]
  if (h, w) == (height, width):
    return img
  # INTER_AREA when shrinking a lot avoids aliasing; linear otherwise (fast).
  interp = cv2.INTER_AREA if (w > 2 * width and h > 2 * height) else cv2.INTER_LINEAR
  return cv2.resize(img, (width, height), interpolation=interp)


def sample_crop_window(rng: np.random.Generator, height: int, width: int,
                       area_range=(0.05, 1.0), aspect_range=(3 / 4, 4 / 3),
                       attempts: int = 10):
  """Inception-style crop window (y, x, h, w): random area and log-uniform aspect.

  Falls back to the whole image when no sample fits in `attempts` tries.
  """
  area = height * width
  log_lo, log_hi = math.log(aspect_range[0]), math.log(aspect_range[1])
  for _ in range(attempts):
    target = area * rng.uniform(area_range[0], area_range[1])
    aspect = math.exp(rng.uniform(log_lo, log_hi))
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      y = int(rng.integers(0, height - h + 1))
      x = int(rng.integers(0, width - w + 1))
      return y, x, h, w
  return 0, 0, height, width


def train_transform(img: np.ndarray, rng: np.random.Generator, crop: int,
                    area_range=(0.05, 1.0), flip: bool = True) -> np.ndarray:
  """Random resized crop to crop x crop, then a random horizontal flip."""
  y, x, h, w = sample_crop_window(rng, img.shape[0], img.shape[1], area_range)
  out = _resize(img[y:y + h, x:x + w], crop, crop)
  if flip and rng.random() < 0.5:
    out = out[:, ::-1]
  return np.ascontiguousarray(out)


def eval_transform(img: np.ndarray, crop: int, mode: str = 'resize',
                   crop_fraction: float = 0.875) -> np.ndarray:
  """'resize': resize to crop x crop (the paper's fine-tuning evaluation).

  'resize_crop': resize the short side to crop / crop_fraction, then take the
  central crop x crop window.
  """
  if mode == 'resize':
    return np.ascontiguousarray(_resize(img, crop, crop))
  if mode != 'resize_crop':
    raise ValueError(f"config.pp.eval_mode must be 'resize' or 'resize_crop', "
                     f'got {mode!r}.')
  h, w = img.shape[:2]
  short = max(crop, int(round(crop / crop_fraction)))
  scale = short / min(h, w)
  nh, nw = max(crop, int(round(h * scale))), max(crop, int(round(w * scale)))
  img = _resize(img, nw, nh)
  y, x = (nh - crop) // 2, (nw - crop) // 2
  return np.ascontiguousarray(img[y:y + crop, x:x + crop])


def normalize_images(images):
  """uint8 images -> float32 in [-1, 1]; works on numpy and jax arrays."""
  return images.astype('float32') / 127.5 - 1.0
