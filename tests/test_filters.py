"""Figure 7 (left): PCA of the embedding filters, and its PNG grid."""

import numpy as np
import pytest
from PIL import Image

from vit_jax.evaluate import filters


def _kernel_from_directions(p=4, channels=3, num_filters=40, stds=(5.0, 3.0, 2.0, 1.0),
                            seed=0):
  """Filters = mean + sum_i a_i u_i, orthonormal u_i, coefficient columns orthogonal and
  centred with norms `stds`: the principal components are u_i, the ratios stds^2/sum."""
  rng = np.random.RandomState(seed)
  size, k = p * p * channels, len(stds)
  directions, _ = np.linalg.qr(rng.normal(size=(size, k)))  # [size, k] orthonormal.
  coefficients = rng.normal(size=(num_filters, k))
  coefficients -= coefficients.mean(axis=0)
  coefficients, _ = np.linalg.qr(coefficients)  # Still centred, now orthonormal columns.
  flat = coefficients * np.asarray(stds) @ directions.T + rng.normal(size=size)  # [d, size]
  kernel = flat.T.reshape(p, p, channels, num_filters)
  return kernel, directions.T.reshape(k, p, p, channels), np.asarray(stds)**2


def test_components_recover_known_directions_and_variances():
  kernel, directions, variances = _kernel_from_directions()
  components, ratio = filters.embedding_filter_components(kernel, num=6)
  assert components.shape == (6, 4, 4, 3) and ratio.shape == (6,)
  for got, want in zip(components[:4], directions):
    sign = np.sign(np.sum(got * want))
    np.testing.assert_allclose(sign * got, want, atol=1e-10)
  np.testing.assert_allclose(ratio[:4], variances / variances.sum(), atol=1e-12)
  np.testing.assert_allclose(ratio[4:], 0, atol=1e-12)  # Only four directions vary.
  # Sign convention: the largest-magnitude entry of each component is positive.
  flat = components[:4].reshape(4, -1)
  assert np.all(flat[np.arange(4), np.argmax(np.abs(flat), axis=1)] > 0)
  # Unit norm and mutually orthogonal.
  np.testing.assert_allclose(flat @ flat.T, np.eye(4), atol=1e-10)


def test_component_errors():
  kernel = np.random.RandomState(0).normal(size=(4, 4, 3, 10))
  with pytest.raises(ValueError, match=r"Cannot take 28 principal components of 10 filters"):
    filters.embedding_filter_components(kernel)
  with pytest.raises(ValueError, match=r"\[patch, patch, channels, filters\]"):
    filters.embedding_filter_components(kernel[..., 0], num=2)
  with pytest.raises(ValueError, match="All embedding filters are equal"):
    filters.embedding_filter_components(np.ones((4, 4, 3, 10)), num=2)


def test_png_grid_has_the_expected_pixels(tmp_path):
  kernel, _, _ = _kernel_from_directions(p=4, num_filters=60, stds=tuple(range(30, 0, -1)))
  components, _ = filters.embedding_filter_components(kernel, num=28)
  path = filters.plot_embedding_filters(components, str(tmp_path / "filters.png"))
  height, width = filters.filter_grid_size(28, 4)  # 4 rows x 7 tiles of 16 px, 2 px gaps.
  assert (height, width) == (4 * 16 + 5 * 2, 7 * 16 + 8 * 2)
  with Image.open(path) as image:
    assert image.format == "PNG" and image.size == (width, height)
    pixels = np.asarray(image.convert("RGB"), np.float64) / 255
  # Tile (row 1, column 2) is component 9 rescaled to [0, 1], magnified 4x.
  top, left = 2 + 1 * 18, 2 + 2 * 18
  tile = pixels[top:top + 16:4, left:left + 16:4]
  np.testing.assert_allclose(tile, filters.rescale_for_display(components[9]), atol=1 / 255)
  assert tile.min() == 0 and tile.max() == 1
  np.testing.assert_array_equal(pixels[:2], 1.0)  # White gap above the first row.


def test_plot_errors():
  with pytest.raises(ValueError, match=r"\[n, patch, patch, 3\]"):
    filters.plot_embedding_filters(np.zeros((2, 4, 4, 5)), "unused.png")
  np.testing.assert_array_equal(filters.rescale_for_display(np.ones((2, 2, 3))), 0.5)
