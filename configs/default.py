"""The embedded default job: a small ViT trained from scratch on scikit-learn's digits.

`python -m vit_jax.main` (no flags) runs it in ./workdir/default. The 8x8 digit scans
are upscaled to 16x16 and cut into 4x4 patches (16 tokens + the class token); the data
module prepares the dataset on first use, nothing is downloaded. On a 2-core CPU it takes
a few minutes and reaches >= 95 % test accuracy (see README, "The main job").
"""

from configs import common

from vit_jax import models


def get_config(arg=None):
  del arg
  c = common.get_config()
  crop = c.pp.get_ref("crop")
  c.model = models.get_config("testing")
  c.model.name = "ViT-digits_4"
  c.model.image_size = crop
  c.model.hidden_size, c.model.mlp_dim, c.model.num_heads, c.model.num_layers = 64, 256, 4, 4
  c.pp.crop = 16
  c.dataset = "digits"
  c.train_split, c.eval_split = "train", "test"
  c.pp.area_range = (0.6, 1.0)  # Digits are small: only mild crops keep them legible.
  c.pp.flip = False  # A mirrored 2 is not a 2.
  c.batch_size, c.eval_batch_size = 128, 360
  c.optimizer, c.lr, c.b1, c.b2, c.weight_decay = "adam", 2e-3, 0.9, 0.999, 1e-4
  c.schedule, c.warmup_steps, c.total_steps = "cosine", 100, 1000
  c.grad_clip_norm = 1.0
  c.label_smoothing = 0.0
  c.log_every, c.eval_every, c.checkpoint_every = 50, 250, 250
  c.keep_checkpoints = 2
  return c
