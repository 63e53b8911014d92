"""Throughput of the training input pipeline (decode + Inception crop + flip).

  python -m vit_jax.benchmark data [--folder ROOT] [--crop 224] [--batch 32]

Without --folder it writes a synthetic image folder into a temporary directory:
JPEGs of 500x375 (smooth random colour fields plus noise, about the size and
decode cost of photos at quality 90), since no real photos can be downloaded
here. It prints images/s for in-process threads and for grain worker processes.
glibc malloc tuning helps in-process decoding; try
MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824.
"""

import os
import time

import cv2
import numpy as np

from vit_jax.data import pipeline


def write_synthetic_folder(root, num_images=1000, num_classes=10, size=(500, 375), seed=0):
  rng = np.random.default_rng(seed)
  w, h = size
  total = 0
  noise = [rng.normal(0, 12, (h, w, 3)).astype(np.float32) for _ in range(4)]
  for i in range(num_images):
    cls_dir = os.path.join(root, 'train', f'class_{i % num_classes:02d}')
    os.makedirs(cls_dir, exist_ok=True)
    low = rng.uniform(0, 255, (6, 8, 3)).astype(np.float32)
    img = cv2.resize(low, (w, h), interpolation=cv2.INTER_CUBIC)
    img += noise[i % 4]
    img = np.clip(img, 0, 255).astype(np.uint8)
    ok, buf = cv2.imencode('.jpg', img, [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    with open(os.path.join(cls_dir, f'{i:05d}.jpg'), 'wb') as f:
      f.write(buf.tobytes())
    total += buf.size
  return total / num_images


def measure(config, batches, warmup=3, repeats=3):
  """Median (images/s, images per CPU-second of this process) after warm-up.

  The CPU-second figure counts this process's threads only (not worker
  processes); it is the robust number on a busy machine.
  """
  it = pipeline.make_train_iterator(config, seed=0, process_index=0, process_count=1)
  try:
    for _ in range(warmup):
      next(it)
    rates, cpu_rates = [], []
    for _ in range(repeats):
      t, c = time.perf_counter(), time.process_time()
      for _ in range(batches):
        b = next(it)
      n = batches * b['image'].shape[0]
      rates.append(n / (time.perf_counter() - t))
      cpu_rates.append(n / max(time.process_time() - c, 1e-9))
  finally:
    it.close()
  return float(np.median(rates)), float(np.median(cpu_rates))


def pipeline_config(folder: str, data_dir: str, *, batch: int, workers: int, threads: int,
                    crop: int, randaugment=None):
  """The default training config reading `folder` with the given pipeline settings
  (`randaugment`: (num_ops, magnitude) or None)."""
  from configs import common  # pylint: disable=g-import-not-at-top
  config = common.get_config()
  config.update(dict(dataset=folder, data_dir=data_dir, batch_size=batch,
                     data_workers=workers, data_threads=threads))
  config.pp.crop = crop
  config.pp.randaugment = randaugment
  return config
