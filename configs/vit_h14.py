"""ViT-H_14 recipes: `--config=configs/vit_h14.py:DATASET` fine-tunes (paper recipe), and
`--config=configs/vit_h14.py:DATASET,pretrain` pre-trains from scratch.

DATASET: cifar10 (default), cifar100, oxford_iiit_pet, oxford_flowers102, imagenet2012;
pre-training also accepts imagenet21k. Fields can be overridden, e.g.
`--config.init_from=/path/ViT-H_14.npz --config.batch_size=256 --config.accum_steps=2`.
"""

from configs import common


def get_config(arg=None):
  return common.recipe("ViT-H_14", arg)
