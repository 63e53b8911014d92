"""DeiT training from scratch on ImageNet (Touvron et al. 2021) for ViT-S/16 and ViT-B/16.

  --config=configs/deit.py:S/16   or   --config=configs/deit.py:B/16

The recipe (DeiT paper, Table 9, for batch 1024): AdamW lr 5e-4 x batch / 512 = 1e-3,
weight decay 0.05, 300 epochs with 5 warm-up epochs then cosine decay, no gradient
clipping, label smoothing 0.1, stochastic depth 0.1 (no dropout), RandAugment (2, 9)
(timm's rand-m9-mstd0.5-inc1), Mixup 0.8 and CutMix 1.0 on every batch (switch 0.5), an
EMA of the weights (0.99996), 224 px Inception crop + flip, random erasing (p 0.25, pixel
noise) and repeated augmentation (3 augmented copies of each image, over different hosts
when there are 3 or more); evaluated on resize 256 / central crop 224.

RandAugment has timm's magnitude noise (mstd 0.5). Left out (not implemented here): the
"increasing" op variants (inc1), bicubic resizing, and the 1e-5 minimum learning rate; so
expect accuracy near, not exactly at, DeiT's 79.8 % (S) / 81.8 % (B).
"""

from configs import common

MODELS = {"S/16": "ViT-S_16", "B/16": "ViT-B_16"}
EPOCHS, WARMUP_EPOCHS, BATCH = 300, 5, 1024


def get_config(arg=None):
  model = (arg or "B/16").strip()
  if model not in MODELS:
    raise ValueError(f"Config argument should be one of {sorted(MODELS)} (e.g. "
                     f"--config=configs/deit.py:S/16); got {arg!r}.")
  c = common.pretrain(MODELS[model], "imagenet2012", epochs=EPOCHS)
  c.batch_size = c.eval_batch_size = BATCH
  steps_per_epoch = common.TRAIN_SIZES["imagenet2012"] // BATCH
  c.total_steps = EPOCHS * steps_per_epoch
  c.warmup_steps = WARMUP_EPOCHS * steps_per_epoch
  c.optimizer, c.lr, c.b1, c.b2, c.weight_decay = "adam", 5e-4 * BATCH / 512, 0.9, 0.999, 0.05
  c.schedule, c.grad_clip_norm = "cosine", 0.0
  c.label_smoothing = 0.1
  c.model.dropout_rate, c.model.stochastic_depth = 0.0, 0.1
  c.pp.eval_mode = "resize_crop"
  c.pp.randaugment, c.pp.randaugment_magnitude_std = (2, 9), 0.5
  c.pp.random_erase, c.pp.repeated_aug = 0.25, 3
  c.mixup_alpha, c.cutmix_alpha, c.mix_prob, c.mix_switch_prob = 0.8, 1.0, 1.0, 0.5
  c.ema_decay = 0.99996
  return c
