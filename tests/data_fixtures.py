"""Shared helpers for the input pipeline tests: tiny datasets built locally."""

import os

import cv2
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

TINY_SIZES = {'train': 37, 'test': 23}


class VitTestTiny(tfds.core.GeneratorBasedBuilder):
  """Registered tfds builder: example i is a constant PNG image of value i.

  Train images are 10x14 RGB, test images 9x7 grayscale. label = i % 3. The
  pixel value identifies the example after any resize / crop.
  """

  VERSION = tfds.core.Version('1.0.0')
  url_infos = None
  code_path = None

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(None, None, 3)),
            'label': tfds.features.ClassLabel(names=['a', 'b', 'c']),
        }))

  def _split_generators(self, dl_manager):
    return {s: self._generate_examples(s, n) for s, n in TINY_SIZES.items()}

  def _generate_examples(self, split, n):
    for i in range(n):
      if split == 'train':
        img = np.full((10, 14, 3), i, np.uint8)
      else:
        img = np.full((9, 7), i, np.uint8)
      yield i, {'image': cv2.imencode('.png', img)[1].tobytes(), 'label': i % 3}


class VitTestNumpy(tfds.core.GeneratorBasedBuilder):
  """Like cifar10: yields uint8 numpy images (tfds would encode them with TF)."""

  VERSION = tfds.core.Version('1.0.0')
  url_infos = None
  code_path = None

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(6, 5, 3)),
            'label': tfds.features.ClassLabel(num_classes=2),
        }))

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples(10), 'test': self._generate_examples(4)}

  def _generate_examples(self, n):
    for i in range(n):
      img = np.zeros((6, 5, 3), np.uint8)
      img[..., 0], img[..., 1], img[..., 2] = 10 * i, 100, 250 - i   # R, G, B
      yield i, {'image': img, 'label': i % 2}


def prepare_tiny(data_dir):
  builder = VitTestTiny(data_dir=str(data_dir), file_format='array_record')
  builder.download_and_prepare()
  return builder


# Per class: (colour, list of (file name, writer)). Writers cover jpg, png,
# webp, bmp, grayscale and RGBA.
RED, BLUE, GRAY = (200, 30, 30), (30, 40, 210), 128


def _rgb(color, h=30, w=40):
  return np.broadcast_to(np.asarray(color, np.uint8), (h, w, 3)).copy()


def write_image_folder(root):
  """Writes ROOT/{train,test}/{blue,gray,red}/ with mixed formats; returns counts."""
  counts = {}
  for split in ('train', 'test'):
    d = lambda c: os.path.join(root, split, c)  # pylint: disable=cell-var-from-loop
    for c in ('red', 'blue', 'gray'):
      os.makedirs(d(c), exist_ok=True)
    Image.fromarray(_rgb(RED)).save(os.path.join(d('red'), 'a.jpg'), quality=95)
    Image.fromarray(_rgb(RED, 50, 20)).save(os.path.join(d('red'), 'b.webp'), lossless=True)
    Image.fromarray(_rgb(RED, 16, 16)).save(os.path.join(d('red'), 'c.bmp'))
    rgba = np.concatenate([_rgb(BLUE), np.full((30, 40, 1), 255, np.uint8)], -1)
    Image.fromarray(rgba, 'RGBA').save(os.path.join(d('blue'), 'a.png'))
    Image.fromarray(_rgb(BLUE, 25, 25)).save(os.path.join(d('blue'), 'b.JPEG'), quality=95)
    Image.fromarray(np.full((20, 30), GRAY, np.uint8), 'L').save(os.path.join(d('gray'), 'a.png'))
    Image.fromarray(np.full((33, 21), GRAY, np.uint8), 'L').save(os.path.join(d('gray'), 'b.jpeg'), quality=95)
    with open(os.path.join(d('gray'), 'notes.txt'), 'w') as f:  # ignored
      f.write('not an image')
    counts[split] = 7
  return counts


def small_config(**kwargs):
  """configs/common.py with a small batch and crop; `kwargs` set top-level fields, `pp` a
  dict of pipeline fields."""
  from configs import common  # pylint: disable=g-import-not-at-top
  pp = kwargs.pop('pp', {})
  cfg = common.get_config()
  cfg.update({'dataset': 'digits', 'data_dir': None, 'train_split': 'train',
              'eval_split': 'test', 'batch_size': 8, 'eval_batch_size': 8,
              'data_workers': 0})
  cfg.pp.update({'crop': 16, 'eval_mode': 'resize', 'area_range': (0.05, 1.0),
                 'flip': True, 'skip_corrupt': False})
  cfg.update(kwargs)
  cfg.pp.update(pp)
  return cfg
