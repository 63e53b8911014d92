"""Fine-tunes the default job's model at twice the resolution (32x32 digits).

Run `python -m vit_jax.main` first; then `python -m vit_jax.main
--config=configs/default_finetune.py` loads ./workdir/default's final parameters, re-initialises
the head and resamples the 4x4 position-embedding grid to 8x8 (the paper's fine-tuning at
higher resolution), and trains with the paper's fine-tuning recipe (SGD momentum, cosine).
"""

from configs import default


def get_config(arg=None):
  c = default.get_config(arg)
  c.init_from = "./workdir/default"  # A workdir (its exported params), .npz or Orbax dir.
  c.pp.crop = 32  # Patch 4 -> an 8x8 grid instead of 4x4.
  c.optimizer, c.lr, c.momentum, c.weight_decay = "sgd", 0.01, 0.9, 0.0
  c.schedule, c.warmup_steps, c.total_steps = "cosine", 30, 300
  c.batch_size = 128
  c.log_every, c.eval_every, c.checkpoint_every = 25, 150, 150
  return c
