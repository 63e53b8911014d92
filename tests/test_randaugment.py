"""RandAugment ops on hand-made images, the magnitude mapping, determinism, grain transform."""

import grain
import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

from vit_jax.data import randaugment as ra


def _random_image(seed=0, shape=(24, 20, 3)):
  return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _ramp(lo, hi, shape=(4, 51)):
  """Every row the ramp lo..hi (inclusive, evenly spaced) in all three channels."""
  row = np.linspace(lo, hi, shape[1]).round().astype(np.uint8)
  return np.repeat(np.tile(row, (shape[0], 1))[..., None], 3, axis=-1)


# ----------------------------------------------------------------------------- single ops

def test_invert_is_255_minus_x():
  img = _random_image()
  np.testing.assert_array_equal(ra.apply_op(img, 'Invert', 7), 255 - img.astype(np.int32))


def test_rotate_at_magnitude_30_is_a_quarter_turn():
  img = _random_image(shape=(9, 9, 3))  # square, odd: the centre is a pixel
  assert ra.op_argument('Rotate', 30) == 90.0
  np.testing.assert_array_equal(ra.apply_op(img, 'Rotate', 30), np.rot90(img, 1))
  np.testing.assert_array_equal(ra.apply_op(img, 'Rotate', 30, negate=True), np.rot90(img, -1))
  even = _random_image(shape=(8, 8, 3))
  np.testing.assert_array_equal(ra.rotate(even, 90), np.rot90(even, 1))
  rect = _random_image(shape=(6, 10, 3))
  np.testing.assert_array_equal(ra.rotate(rect, 180), rect[::-1, ::-1])


def test_rotate_fills_uncovered_corners_gray():
  img = np.zeros((21, 21, 3), np.uint8)
  out = ra.rotate(img, 45)
  assert (out[0, 0] == 128).all() and (out[10, 10] == 0).all()


def test_solarize_inverts_only_pixels_at_or_above_threshold():
  img = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=-1)
  out = ra.solarize(img, 100)
  v = np.arange(256)
  expected = np.where(v >= 100, 255 - v, v).reshape(16, 16, 1).repeat(3, axis=-1)
  np.testing.assert_array_equal(out, expected)
  # Magnitude m gives threshold int(25.6 m): 5 -> 128, 10 -> 256 (no pixel), 0 -> all.
  assert [ra.op_argument('Solarize', m) for m in (0, 5, 10)] == [0, 128, 256]
  np.testing.assert_array_equal(ra.apply_op(img, 'Solarize', 10), img)
  np.testing.assert_array_equal(ra.apply_op(img, 'Solarize', 0), 255 - img)


def test_solarize_add_adds_to_dark_pixels_only_and_saturates():
  img = np.array([[[0, 27, 100], [127, 128, 255]]], np.uint8)
  assert ra.op_argument('SolarizeAdd', 10) == 110
  out = ra.apply_op(img, 'SolarizeAdd', 10)
  np.testing.assert_array_equal(out, [[[110, 137, 210], [237, 128, 255]]])
  np.testing.assert_array_equal(ra.solarize_add(img, 200), [[[200, 227, 255], [255, 128, 255]]])


@pytest.mark.parametrize('bits', range(9))
def test_posterize_keeps_the_top_bits(bits):
  img = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=-1)
  mask = (0xFF << (8 - bits)) & 0xFF
  np.testing.assert_array_equal(ra.posterize(img, bits), img & mask)


def test_posterize_magnitude_mapping():
  # int(0.4 m) bits: 0 bits at M = 0 (black), 4 at M = 10, capped at 8 (unchanged).
  assert [ra.op_argument('Posterize', m) for m in (0, 2.5, 5, 10, 20, 30)] == [0, 1, 2, 4, 8, 8]
  img = _random_image()
  np.testing.assert_array_equal(ra.apply_op(img, 'Posterize', 0), np.zeros_like(img))
  np.testing.assert_array_equal(ra.apply_op(img, 'Posterize', 30), img)


def test_autocontrast_stretches_a_ramp_to_full_range():
  img = _ramp(50, 150)
  out = ra.autocontrast(img)
  expected = np.rint((img.astype(np.float64) - 50) * 255 / 100)
  np.testing.assert_array_equal(out, expected)
  assert out.min() == 0 and out.max() == 255
  flat = np.full((3, 3, 3), 77, np.uint8)
  np.testing.assert_array_equal(ra.autocontrast(flat), flat)


def test_autocontrast_works_per_channel():
  img = np.zeros((1, 2, 3), np.uint8)
  img[0, :, 0] = (10, 20)
  img[0, :, 1] = (0, 255)
  img[0, :, 2] = (5, 5)
  np.testing.assert_array_equal(ra.autocontrast(img), [[[0, 0, 5], [255, 255, 5]]])


def test_equalize_on_known_histograms():
  # One pixel of each level 0..255: already equalised, unchanged.
  ramp = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=-1)
  np.testing.assert_array_equal(ra.equalize(ramp), ramp)
  # Two levels, half the pixels each: step = 256 // 255 = 1, 10 -> 0, 20 -> 256 -> 255.
  two = np.full((16, 32, 3), 10, np.uint8)
  two[:, 16:] = 20
  out = ra.equalize(two)
  assert set(np.unique(out[:, :16])) == {0} and set(np.unique(out[:, 16:])) == {255}
  # Too few pixels for a step (step = 0): unchanged.
  small = _ramp(0, 3, shape=(2, 4))
  np.testing.assert_array_equal(ra.equalize(small), small)


def test_histogram_ops_agree_with_pil():
  img = _random_image(3, (40, 30, 3))
  low = (img // 3 + 40).astype(np.uint8)
  np.testing.assert_array_equal(ra.equalize(img), np.asarray(ImageOps.equalize(Image.fromarray(img))))
  np.testing.assert_array_equal(ra.autocontrast(low),
                                np.asarray(ImageOps.autocontrast(Image.fromarray(low))))


def test_brightness_extremes():
  img = _random_image()
  np.testing.assert_array_equal(ra.brightness(img, 0.0), np.zeros_like(img))
  np.testing.assert_array_equal(ra.brightness(img, 1.0), img)
  np.testing.assert_array_equal(ra.brightness(img, 0.5), np.rint(img / 2))
  np.testing.assert_array_equal(ra.brightness(img, 2.0), np.minimum(2 * img.astype(int), 255))


def test_color_and_contrast_degenerate_images():
  img = _random_image()
  r, g, b = (img[..., c].astype(np.int64) for c in range(3))
  luma = (299 * r + 587 * g + 114 * b + 500) // 1000
  np.testing.assert_array_equal(ra.color(img, 0.0), np.stack([luma] * 3, axis=-1))
  np.testing.assert_array_equal(ra.contrast(img, 0.0), np.full_like(img, int(luma.mean() + 0.5)))
  for fn in (ra.color, ra.contrast, ra.sharpness):
    np.testing.assert_array_equal(fn(img, 1.0), img)


def test_sharpness_zero_is_the_smooth_filter_inside_and_keeps_the_border():
  img = _random_image(shape=(6, 7, 3))
  out = ra.sharpness(img, 0.0)
  x = img.astype(np.float64)
  weights = np.ones((3, 3)) / 13
  weights[1, 1] = 5 / 13
  inner = sum(weights[dy, dx] * x[dy:dy + 4, dx:dx + 5] for dy in range(3) for dx in range(3))
  np.testing.assert_array_equal(out[1:-1, 1:-1], np.rint(inner))
  np.testing.assert_array_equal(out[0], img[0])
  np.testing.assert_array_equal(out[:, -1], img[:, -1])


@pytest.mark.parametrize('name, fn', [('Color', ra.color), ('Contrast', ra.contrast),
                                      ('Brightness', ra.brightness),
                                      ('Sharpness', ra.sharpness)])
def test_enhance_ops_agree_with_pil_to_rounding(name, fn):
  img = _random_image(5, (20, 16, 3))
  for factor in (0.1, 0.6, 1.9):
    ref = np.asarray(getattr(ImageEnhance, name)(Image.fromarray(img)).enhance(factor))
    # PIL truncates where we round: at most one level from the blend plus one from luma.
    assert np.abs(fn(img, factor).astype(int) - ref).max() <= 2


def test_enhance_magnitude_mapping():
  for name in ('Color', 'Contrast', 'Brightness', 'Sharpness'):
    assert ra.op_argument(name, 0) == pytest.approx(0.1)
    assert ra.op_argument(name, 5) == pytest.approx(1.0)
    assert ra.op_argument(name, 10) == pytest.approx(1.9)
    assert ra.op_argument(name, 15) == pytest.approx(2.8)
  img = _random_image()
  np.testing.assert_array_equal(ra.apply_op(img, 'Brightness', 5), img)


def test_translate_moves_content_and_fills_gray():
  img = _random_image(shape=(10, 20, 3))
  # M = 10: 0.45 of the width, 9 pixels of 20; the content moves left (negate: right).
  assert ra.op_argument('TranslateX', 10) == pytest.approx(0.45)
  out = ra.apply_op(img, 'TranslateX', 10)
  np.testing.assert_array_equal(out[:, :11], img[:, 9:])
  assert (out[:, 11:] == 128).all()
  out = ra.apply_op(img, 'TranslateX', 10, negate=True)
  np.testing.assert_array_equal(out[:, 9:], img[:, :11])
  assert (out[:, :9] == 128).all()
  out = ra.translate_y(img, 3)
  np.testing.assert_array_equal(out[:7], img[3:])
  assert (out[7:] == 128).all()


def test_shear_maps_coordinates_as_defined():
  img = _random_image(shape=(8, 12, 3))
  shear = ra.op_argument('ShearX', 10)
  assert shear == pytest.approx(0.3)
  out = ra.shear_x(img, 1 / 3)  # no ties: x + y / 3 is never a half-integer
  for y in range(8):
    for x in range(12):
      xs = int(np.floor(x + y / 3 + 0.5))  # nearest sample of input (x + y / 3, y)
      expected = img[y, xs] if xs < 12 else 128
      np.testing.assert_array_equal(out[y, x], expected)
  np.testing.assert_array_equal(ra.shear_y(img, 1.0)[:, 0], img[:, 0])
  np.testing.assert_array_equal(ra.shear_y(img, 1.0)[0, 3], img[3, 3])


def test_cutout_paints_a_clipped_gray_square():
  img = np.zeros((10, 10, 3), np.uint8)
  assert ra.op_argument('Cutout', 10) == 40 and ra.op_argument('Cutout', 1) == 4
  out = ra.cutout(img, 2, (1, 8))
  expected = np.zeros_like(img)
  expected[0:3, 6:10] = 128
  np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize('name', ra.IDENTITY_AT_ZERO)
def test_magnitude_zero_is_identity_for_these_ops(name):
  img = _random_image(7)
  out = ra.apply_op(img, name, 0, negate=True, rng=np.random.default_rng(0))
  np.testing.assert_array_equal(out, img)


@pytest.mark.parametrize('name', sorted(set(ra.OP_NAMES) - set(ra.IDENTITY_AT_ZERO)))
def test_magnitude_zero_changes_the_image_for_the_others(name):
  img = _random_image(7)
  assert not np.array_equal(ra.apply_op(img, name, 0), img)


@pytest.mark.parametrize('name', ra.OP_NAMES)
def test_every_op_keeps_dtype_and_shape(name):
  img = _random_image(shape=(13, 17, 3))
  out = ra.apply_op(img, name, 9, rng=np.random.default_rng(1))
  assert out.dtype == np.uint8 and out.shape == img.shape and out.flags.c_contiguous


# ----------------------------------------------------------------------------- the policy

def test_same_seed_same_output_different_seed_different():
  augment = ra.RandAugment(2, 9)
  img = _random_image(11, (32, 32, 3))
  outs = [augment(img, np.random.default_rng(s)) for s in (5, 5, 6, 7)]
  np.testing.assert_array_equal(outs[0], outs[1])
  assert not np.array_equal(outs[0], outs[2]) or not np.array_equal(outs[0], outs[3])
  assert all(o.dtype == np.uint8 and o.shape == img.shape for o in outs)
  np.testing.assert_array_equal(img, _random_image(11, (32, 32, 3)))  # input untouched


def test_policy_draws_ops_uniformly_and_applies_num_ops():
  # With a single-op list, num_ops Inverts cancel in pairs.
  img = _random_image()
  np.testing.assert_array_equal(ra.RandAugment(3, 5, ops=['Invert'])(img, np.random.default_rng(0)),
                                255 - img)
  np.testing.assert_array_equal(ra.RandAugment(2, 5, ops=['Invert'])(img, np.random.default_rng(0)),
                                img)
  np.testing.assert_array_equal(ra.RandAugment(0, 5)(img, np.random.default_rng(0)), img)
  # Uniform choice: with (Invert, Identity, Identity, Identity) a quarter of images invert.
  augment = ra.RandAugment(1, 5, ops=['Invert', 'Identity', 'Identity', 'Identity'])
  tiny = _random_image(shape=(2, 2, 3))
  inverted = sum(int(augment(tiny, np.random.default_rng(s))[0, 0, 0] != tiny[0, 0, 0])
                 for s in range(2000))
  assert 420 <= inverted <= 580  # 500 +- 4 standard deviations


def test_prob_zero_applies_nothing():
  img = _random_image()
  np.testing.assert_array_equal(ra.RandAugment(4, 10, prob=0.0)(img, np.random.default_rng(3)), img)


def test_op_lists():
  assert len(ra.DEFAULT_OPS) == 15 and len(set(ra.DEFAULT_OPS)) == 15
  assert set(ra.BIG_VISION_OPS) - set(ra.DEFAULT_OPS) == {'Cutout'}
  assert len(ra.PAPER_OPS) == 14 and 'Identity' in ra.PAPER_OPS and 'Invert' not in ra.PAPER_OPS


@pytest.mark.parametrize('kwargs, message', [
    (dict(num_ops=2, magnitude=9, ops=['Rotate', 'Blur']), r"Unknown RandAugment op\(s\) \['Blur'\]"),
    (dict(num_ops=2, magnitude=9, ops='Rotate'), 'sequence of op names'),
    (dict(num_ops=2, magnitude=9, ops=[]), 'at least one op'),
    (dict(num_ops=2, magnitude=31), r'magnitude must be a number in \[0, 30\]'),
    (dict(num_ops=2, magnitude=-1), r'in \[0, 30\]'),
    (dict(num_ops=2, magnitude='high'), r'in \[0, 30\]'),
    (dict(num_ops=-1, magnitude=9), 'num_ops must be an integer >= 0'),
    (dict(num_ops=1.5, magnitude=9), 'num_ops must be an integer >= 0'),
    (dict(num_ops=2, magnitude=9, prob=1.5), r'prob .* must be in \[0, 1\]'),
])
def test_bad_arguments_are_refused(kwargs, message):
  with pytest.raises(ValueError, match=message):
    ra.RandAugment(**kwargs)


def test_bad_images_are_refused():
  augment = ra.RandAugment(1, 5)
  with pytest.raises(ValueError, match=r'uint8 RGB image \[height, width, 3\]'):
    augment(np.zeros((4, 4, 3), np.float32), np.random.default_rng(0))
  with pytest.raises(ValueError, match='uint8 RGB image'):
    augment(np.zeros((4, 4), np.uint8), np.random.default_rng(0))


def test_grain_transform_is_deterministic_per_element():
  images = [_random_image(i, (16, 16, 3)) for i in range(6)]
  records = [{'image': im, 'label': np.int32(i)} for i, im in enumerate(images)]
  transform = ra.RandAugmentTransform(2, 10)
  ds = grain.MapDataset.source(records).random_map(transform, seed=42)
  first = [ds[i] for i in range(6)]
  again = [ds[i] for i in reversed(range(6))][::-1]  # any order: rng from (seed, index)
  other = grain.MapDataset.source(records).random_map(transform, seed=43)
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a['image'], b['image'])
  assert [r['label'] for r in first] == list(range(6))
  assert any(not np.array_equal(a['image'], other[i]['image']) for i, a in enumerate(first))
  assert any(not np.array_equal(a['image'], im) for a, im in zip(first, images))
