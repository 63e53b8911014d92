"""RandAugment (Cubuk et al. 2020) on host uint8 images, with big_vision's semantics.

Per image, `num_ops` operations are drawn uniformly (with replacement) from the op list
and applied in sequence, all at the same magnitude M. Every op maps M to its argument
through the level M / 10, as big_vision's `randaug` (the TF EfficientNet autoaugment code
that the AugReg ViT recipes used):

  op             argument at level l = M / 10        M = 0        M = 10
  AutoContrast   -                                   (no magnitude)
  Equalize       -                                   (no magnitude)
  Invert         -                                   (no magnitude)
  Rotate         +-30 l degrees (counterclockwise +)  unchanged    +-30 degrees
  Posterize      keep int(4 l) top bits (max 8)       black        4 bits
  Solarize       invert pixels >= int(256 l)          all inverted unchanged
  SolarizeAdd    add int(110 l) to pixels < 128       unchanged    +110
  Color          saturation factor 0.1 + 1.8 l        0.1          1.9   (1 = unchanged)
  Contrast       contrast factor 0.1 + 1.8 l          0.1          1.9
  Brightness     brightness factor 0.1 + 1.8 l        0.1          1.9
  Sharpness      sharpness factor 0.1 + 1.8 l         0.1          1.9
  ShearX/ShearY  shear +-0.3 l                        unchanged    +-0.3
  TranslateX/Y   shift +-0.45 l of the width/height   unchanged    +-0.45
  Cutout         gray square of side 2 int(40 l)      unchanged    80 pixels  (opt-in)
  Identity       -                                   (opt-in; the paper's list)

`+-`: the sign is drawn per application (probability 1/2 each), as big_vision and timm.
Like big_vision (and unlike timm's 0.1..1.9 clamp at M = 10), M may exceed 10: the
AugReg recipes use M = 15 and 20; the accepted range is [0, MAX_MAGNITUDE = 30].
At M = 0 exactly these ops leave the image unchanged: Rotate, ShearX, ShearY,
TranslateX, TranslateY, SolarizeAdd, Cutout, Identity (`IDENTITY_AT_ZERO`).

Default op list (`DEFAULT_OPS`, 15 ops): big_vision's 16 without Cutout, which is timm's
`_RAND_TRANSFORMS` list (timm does Cutout as separate random erasing). The paper's 14
(`PAPER_OPS`) have Identity and no Invert, SolarizeAdd or Cutout; `BIG_VISION_OPS` adds
Cutout for an exact big_vision recipe.

Details that follow big_vision rather than timm/PIL: geometric ops use nearest-neighbour
sampling and fill uncovered pixels with gray (128); every drawn op is applied (timm
applies each with p = 0.5; `prob` gives that). Translation is relative to the image size
(timm's TranslateRel; big_vision's 100 pixels at M = 10 is 0.446 of a 224 crop).
Contrast blends towards the mean gray level (PIL), not TF's pixel count / 256.
"""

import math
from typing import Callable, Optional, Sequence

import cv2
import grain
import numpy as np

MAX_MAGNITUDE = 30.0
_LEVEL_SCALE = 10.0  # M = 10 is the top of each op's reference range.
_FILL = 128

DEFAULT_OPS = ('AutoContrast', 'Equalize', 'Invert', 'Rotate', 'Posterize', 'Solarize',
               'SolarizeAdd', 'Color', 'Contrast', 'Brightness', 'Sharpness', 'ShearX',
               'ShearY', 'TranslateX', 'TranslateY')
BIG_VISION_OPS = DEFAULT_OPS + ('Cutout',)
PAPER_OPS = ('Identity', 'AutoContrast', 'Equalize', 'Rotate', 'Solarize', 'Color',
             'Posterize', 'Contrast', 'Brightness', 'Sharpness', 'ShearX', 'ShearY',
             'TranslateX', 'TranslateY')
IDENTITY_AT_ZERO = ('Rotate', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY',
                    'SolarizeAdd', 'Cutout', 'Identity')

# ----------------------------------------------------------------------------- colour ops


def _to_uint8(x) -> np.ndarray:
  return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def grayscale(image: np.ndarray) -> np.ndarray:
  """ITU-R 601-2 luma (PIL's 'L' conversion, rounded): [h, w, 3] -> [h, w] uint8."""
  r, g, b = (image[..., c].astype(np.int32) for c in range(3))
  return ((299 * r + 587 * g + 114 * b + 500) // 1000).astype(np.uint8)


def blend(degenerate: np.ndarray, image: np.ndarray, factor: float) -> np.ndarray:
  """degenerate + factor (image - degenerate), rounded and clipped; 1 gives `image`."""
  if factor == 1.0:
    return image.copy()
  d = degenerate.astype(np.float32)
  return _to_uint8(d + np.float32(factor) * (image.astype(np.float32) - d))


def invert(image: np.ndarray) -> np.ndarray:
  return 255 - image


def posterize(image: np.ndarray, bits: int) -> np.ndarray:
  """Keeps the `bits` most significant bits of every value (0 bits: black)."""
  shift = 8 - int(np.clip(bits, 0, 8))
  return ((image >> shift) << shift).astype(np.uint8)


def solarize(image: np.ndarray, threshold: int) -> np.ndarray:
  """Inverts the values >= threshold (0: the whole image; 256: none)."""
  return np.where(image < threshold, image, 255 - image).astype(np.uint8)


def solarize_add(image: np.ndarray, addition: int, threshold: int = 128) -> np.ndarray:
  """Adds `addition` (saturating) to the values below `threshold`."""
  added = np.clip(image.astype(np.int32) + addition, 0, 255).astype(np.uint8)
  return np.where(image < threshold, added, image)


def autocontrast(image: np.ndarray) -> np.ndarray:
  """Per channel, stretches [min, max] linearly to [0, 255]; flat channels unchanged."""
  out = image.copy()
  for c in range(image.shape[-1]):
    channel = image[..., c].astype(np.float32)
    lo, hi = channel.min(), channel.max()
    if hi > lo:
      out[..., c] = _to_uint8((channel - lo) * (255.0 / (hi - lo)))
  return out


def equalize(image: np.ndarray) -> np.ndarray:
  """Per-channel histogram equalisation with PIL's lookup table.

  step = (pixels - count of the highest level present) // 255; level v maps to
  (number of pixels below v + step // 2) // step. A channel with step 0 is unchanged.
  """
  out = image.copy()
  for c in range(image.shape[-1]):
    channel = image[..., c]
    hist = np.bincount(channel.ravel(), minlength=256)
    last_count = hist[np.nonzero(hist)[0][-1]]
    step = (channel.size - last_count) // 255
    if step == 0:
      continue
    below = np.concatenate([[0], np.cumsum(hist)[:-1]])
    lut = np.clip((below + step // 2) // step, 0, 255).astype(np.uint8)
    out[..., c] = lut[channel]
  return out


def color(image: np.ndarray, factor: float) -> np.ndarray:
  """Saturation: 0 gives the grayscale image, 1 the image."""
  return blend(np.repeat(grayscale(image)[..., None], 3, axis=-1), image, factor)


def contrast(image: np.ndarray, factor: float) -> np.ndarray:
  """0 gives a flat image at the mean gray level, 1 the image."""
  mean = int(grayscale(image).mean() + 0.5)
  return blend(np.full_like(image, mean), image, factor)


def brightness(image: np.ndarray, factor: float) -> np.ndarray:
  """0 gives black, 1 the image."""
  return blend(np.zeros_like(image), image, factor)


_SMOOTH = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32) / 13.0


def sharpness(image: np.ndarray, factor: float) -> np.ndarray:
  """0 gives PIL's 3x3 SMOOTH-filtered image (border pixels kept), 1 the image."""
  smooth = image.copy()
  if min(image.shape[:2]) >= 3:
    filtered = cv2.filter2D(image.astype(np.float32), -1, _SMOOTH,
                            borderType=cv2.BORDER_REFLECT_101)
    smooth[1:-1, 1:-1] = _to_uint8(filtered[1:-1, 1:-1])
  return blend(smooth, image, factor)


# ----------------------------------------------------------------------------- geometric ops


def _warp(image: np.ndarray, output_to_input: np.ndarray) -> np.ndarray:
  """Samples image at output_to_input @ (x, y, 1) (nearest); outside pixels are gray."""
  h, w = image.shape[:2]
  return cv2.warpAffine(image, output_to_input.astype(np.float64), (w, h),
                        flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP,
                        borderMode=cv2.BORDER_CONSTANT, borderValue=(_FILL,) * 3)


def rotate(image: np.ndarray, degrees: float) -> np.ndarray:
  """Rotates the content counterclockwise (as np.rot90) about the image centre."""
  h, w = image.shape[:2]
  t = math.radians(degrees)
  cos, sin = math.cos(t), math.sin(t)
  cx, cy = (w - 1) / 2, (h - 1) / 2
  # Output pixel p samples the input at centre + R(t) (p - centre), with y pointing down.
  matrix = np.array([[cos, -sin, cx - cos * cx + sin * cy],
                     [sin, cos, cy - sin * cx - cos * cy]])
  return _warp(image, matrix)


def shear_x(image: np.ndarray, shear: float) -> np.ndarray:
  """Output (x, y) takes input (x + shear y, y) (origin at the top-left, as PIL)."""
  return _warp(image, np.array([[1.0, shear, 0.0], [0.0, 1.0, 0.0]]))


def shear_y(image: np.ndarray, shear: float) -> np.ndarray:
  """Output (x, y) takes input (x, y + shear x)."""
  return _warp(image, np.array([[1.0, 0.0, 0.0], [shear, 1.0, 0.0]]))


def translate_x(image: np.ndarray, pixels: float) -> np.ndarray:
  """Output (x, y) takes input (x + pixels, y): the content moves left by `pixels`."""
  return _warp(image, np.array([[1.0, 0.0, pixels], [0.0, 1.0, 0.0]]))


def translate_y(image: np.ndarray, pixels: float) -> np.ndarray:
  """Output (x, y) takes input (x, y + pixels): the content moves up by `pixels`."""
  return _warp(image, np.array([[1.0, 0.0, 0.0], [0.0, 1.0, pixels]]))


def cutout(image: np.ndarray, half_size: int, center: tuple[int, int]) -> np.ndarray:
  """Fills the square [cy - half_size, cy + half_size) x (same in x), clipped, with gray."""
  cy, cx = center
  out = image.copy()
  out[max(cy - half_size, 0):max(cy + half_size, 0),
      max(cx - half_size, 0):max(cx + half_size, 0)] = _FILL
  return out


# ----------------------------------------------------------------------------- the policy


def _signed(value: float, negate: bool) -> float:
  return -value if negate else value


def _enhance_factor(level: float) -> float:
  return level * 1.8 + 0.1


# name -> (level, negate) -> the op's argument; None for ops without a magnitude.
_ARGUMENTS: dict[str, Optional[Callable[[float, bool], float]]] = {
    'Identity': None,
    'AutoContrast': None,
    'Equalize': None,
    'Invert': None,
    'Rotate': lambda level, neg: _signed(level * 30.0, neg),
    'Posterize': lambda level, neg: min(int(level * 4), 8),
    'Solarize': lambda level, neg: int(level * 256),
    'SolarizeAdd': lambda level, neg: int(level * 110),
    'Color': lambda level, neg: _enhance_factor(level),
    'Contrast': lambda level, neg: _enhance_factor(level),
    'Brightness': lambda level, neg: _enhance_factor(level),
    'Sharpness': lambda level, neg: _enhance_factor(level),
    'ShearX': lambda level, neg: _signed(level * 0.3, neg),
    'ShearY': lambda level, neg: _signed(level * 0.3, neg),
    'TranslateX': lambda level, neg: _signed(level * 0.45, neg),
    'TranslateY': lambda level, neg: _signed(level * 0.45, neg),
    'Cutout': lambda level, neg: int(level * 40),
}


def _random_center(image, rng):
  h, w = image.shape[:2]
  return int(rng.integers(h)), int(rng.integers(w))


# name -> (image, argument, rng) -> image
_APPLY: dict[str, Callable] = {
    'Identity': lambda img, arg, rng: img,
    'AutoContrast': lambda img, arg, rng: autocontrast(img),
    'Equalize': lambda img, arg, rng: equalize(img),
    'Invert': lambda img, arg, rng: invert(img),
    'Rotate': lambda img, arg, rng: rotate(img, arg),
    'Posterize': lambda img, arg, rng: posterize(img, arg),
    'Solarize': lambda img, arg, rng: solarize(img, arg),
    'SolarizeAdd': lambda img, arg, rng: solarize_add(img, arg),
    'Color': lambda img, arg, rng: color(img, arg),
    'Contrast': lambda img, arg, rng: contrast(img, arg),
    'Brightness': lambda img, arg, rng: brightness(img, arg),
    'Sharpness': lambda img, arg, rng: sharpness(img, arg),
    'ShearX': lambda img, arg, rng: shear_x(img, arg),
    'ShearY': lambda img, arg, rng: shear_y(img, arg),
    'TranslateX': lambda img, arg, rng: translate_x(img, arg * img.shape[1]),
    'TranslateY': lambda img, arg, rng: translate_y(img, arg * img.shape[0]),
    'Cutout': lambda img, arg, rng: cutout(img, arg, _random_center(img, rng)),
}

OP_NAMES = tuple(_APPLY)


def check_op_names(ops: Sequence[str]) -> tuple[str, ...]:
  if isinstance(ops, str):
    raise ValueError(f'RandAugment ops must be a sequence of op names, got the string '
                     f'{ops!r}; e.g. ({ops!r},).')
  ops = tuple(ops)
  unknown = [name for name in ops if name not in _APPLY]
  if unknown:
    raise ValueError(f'Unknown RandAugment op(s) {unknown}; valid names: {OP_NAMES}.')
  if not ops:
    raise ValueError(f'RandAugment needs at least one op; valid names: {OP_NAMES}.')
  return ops


def check_magnitude_std(magnitude_std) -> float:
  """timm's magnitude noise: a finite number >= 0 (0 = off)."""
  if not (isinstance(magnitude_std, (int, float, np.number)) and not isinstance(
      magnitude_std, bool) and 0.0 <= float(magnitude_std) < float('inf')):
    raise ValueError(f'RandAugment magnitude_std must be a finite number >= 0 (0 = off; '
                     f'DeiT 0.5), got {magnitude_std!r}.')
  return float(magnitude_std)


def check_magnitude(magnitude) -> float:
  try:
    value = float(magnitude)
  except (TypeError, ValueError):
    value = float('nan')
  if not 0.0 <= value <= MAX_MAGNITUDE:
    raise ValueError(f'RandAugment magnitude must be a number in [0, {MAX_MAGNITUDE:g}] '
                     f'(10 = the top of every op\'s reference range; big_vision recipes use '
                     f'10-20), got {magnitude!r}.')
  return value


def op_argument(name: str, magnitude: float, negate: bool = False):
  """The argument op `name` gets at magnitude M (degrees, bits, factor, ...); None if none.

  For TranslateX/Y it is the fraction of the width/height; `negate` flips signed ops.
  """
  check_op_names((name,))
  level_fn = _ARGUMENTS[name]
  if level_fn is None:
    return None
  return level_fn(check_magnitude(magnitude) / _LEVEL_SCALE, bool(negate))


def apply_op(image: np.ndarray, name: str, magnitude: float, *, negate: bool = False,
             rng: Optional[np.random.Generator] = None) -> np.ndarray:
  """Applies one op at magnitude M; `rng` is only used by Cutout (the square's centre)."""
  arg = op_argument(name, magnitude, negate)
  if name == 'Cutout' and rng is None:
    raise ValueError("RandAugment op 'Cutout' needs an rng for the square's position.")
  return np.ascontiguousarray(_APPLY[name](image, arg, rng))


def _check_image(image):
  if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3
          and image.shape[-1] == 3):
    got = (f'{image.dtype} {image.shape}' if isinstance(image, np.ndarray)
           else type(image).__name__)
    raise ValueError(f'RandAugment expects a uint8 RGB image [height, width, 3], got {got}.')


class RandAugment:
  """`RandAugment(num_ops, magnitude, ops=None)(image uint8 [h, w, 3], rng) -> same`.

  For each of num_ops layers, from `rng` in this order: the op (uniform over `ops`), its
  sign (negative with probability 1/2; drawn for every op, used by signed ops), whether
  to apply it (only when prob < 1), its magnitude (only when magnitude_std > 0: timm's
  magnitude noise, N(magnitude, magnitude_std) clipped to [0, 30]; timm clips at 10), and
  Cutout's centre. Deterministic given the rng.
  """

  def __init__(self, num_ops: int, magnitude: float, ops: Optional[Sequence[str]] = None,
               prob: float = 1.0, magnitude_std: float = 0.0):
    if isinstance(num_ops, bool) or not isinstance(num_ops, (int, np.integer)) or num_ops < 0:
      raise ValueError(f'RandAugment num_ops must be an integer >= 0 (0 = off; 2 is usual), '
                       f'got {num_ops!r}.')
    if not 0.0 <= float(prob) <= 1.0:
      raise ValueError(f'RandAugment prob (of applying each drawn op) must be in [0, 1], '
                       f'got {prob!r}.')
    self.num_ops = int(num_ops)
    self.magnitude = check_magnitude(magnitude)
    self.ops = check_op_names(DEFAULT_OPS if ops is None else ops)
    self.prob = float(prob)
    self.magnitude_std = check_magnitude_std(magnitude_std)

  def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    _check_image(image)
    for _ in range(self.num_ops):
      name = self.ops[int(rng.integers(len(self.ops)))]
      negate = bool(rng.random() < 0.5)
      if self.prob < 1.0 and not rng.random() < self.prob:
        continue
      magnitude = self.magnitude
      if self.magnitude_std > 0:
        magnitude = float(np.clip(rng.normal(magnitude, self.magnitude_std), 0, MAX_MAGNITUDE))
      image = apply_op(image, name, magnitude, negate=negate, rng=rng)
    return image

  def __repr__(self):
    return (f'RandAugment(num_ops={self.num_ops}, magnitude={self.magnitude:g}, '
            f'ops={self.ops}, prob={self.prob:g}, magnitude_std={self.magnitude_std:g})')


class RandAugmentTransform(grain.transforms.RandomMap):
  """grain transform: RandAugment of `element[key]` with grain's per-element rng.

  `MapDataset.random_map(RandAugmentTransform(2, 15), seed=seed)` seeds each element's
  generator from (seed, element index), so it is deterministic and resumes exactly.
  """

  def __init__(self, num_ops: int, magnitude: float, ops: Optional[Sequence[str]] = None,
               prob: float = 1.0, key: str = 'image'):
    self.augment = RandAugment(num_ops, magnitude, ops, prob)
    self.key = key

  def random_map(self, element: dict, rng: np.random.Generator) -> dict:
    return {**element, self.key: self.augment(element[self.key], rng)}
