"""Fine-tune a published ViT-B/16 on your own photos: an image folder, little data.

  python -m vit_jax.main --config=configs/folder_finetune.py:/path/to/photos \
      --workdir=workdir/photos

The folder is laid out ROOT/train/<class>/*.jpg and ROOT/test/<class>/*.jpg (prepare it
once with `python -m vit_jax.prepare /path/to/photos`, which also checks every image
decodes). With tens to hundreds of images per class, training from scratch overfits;
what works is the paper's transfer recipe from the ImageNet-21k checkpoint
(`gsutil cp gs://vit_models/imagenet21k/ViT-B_16.npz pretrained/imagenet21k/`) with
light augmentation: Inception crop (not below 35 % of the image) + flip + RandAugment
(2, 5), no Mixup, label smoothing 0.1, SGD momentum 0.9 at lr 0.01 with a cosine decay,
500 steps of batch 64 at 224 px, evaluated every 100 steps, the EMA of the weights
reported too (`ema/accuracy`) and exported to params/ if it is better: set
--config.export_ema=True.
"""

from configs import common


def get_config(arg=None):
  if not arg:
    raise ValueError("Give the image folder as the config argument: "
                     "--config=configs/folder_finetune.py:/path/to/photos")
  c = common.get_config()
  common._set_model(c, "ViT-B_16")  # pylint: disable=protected-access
  c.dataset = arg
  c.train_split, c.eval_split = "train", "test"
  c.init_from = "pretrained/imagenet21k/ViT-B_16.npz"
  c.pp.crop = 224
  c.pp.area_range = (0.35, 1.0)
  c.pp.randaugment = (2, 5)
  c.label_smoothing = 0.1
  c.optimizer, c.lr, c.momentum, c.weight_decay = "sgd", 0.01, 0.9, 0.0
  c.schedule, c.warmup_steps, c.total_steps, c.grad_clip_norm = "cosine", 50, 500, 1.0
  c.batch_size = c.eval_batch_size = 64
  c.log_every, c.eval_every, c.checkpoint_every = 20, 100, 100
  c.ema_decay = 0.99
  return c
