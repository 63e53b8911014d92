"""AugReg pre-training (Steiner et al. 2021, "How to train your ViT?") for ViT-S/16, B/16.

  --config=configs/augreg.py:MODEL,DATASET[,SETTING]
  e.g. configs/augreg.py:B/16,imagenet2012  or  configs/augreg.py:S/16,imagenet21k,light1

MODEL is S/16 or B/16; DATASET imagenet2012 or imagenet21k; SETTING one of AUG_SETTINGS
('light', 'medium', 'strong' mean light1, medium1, strong1). Without SETTING, each
(model, dataset) gets the setting, weight decay, dropout and stochastic depth of its
published AugReg checkpoint (`PUBLISHED`, the file names in gs://vit_models/augreg/).

The shared recipe (paper Sec. 3, big_vision's vit_i1k.py / vit_i21k.py): Adam (0.9, 0.999),
lr 1e-3, batch 4096, 10k warm-up steps then cosine decay, global-norm clip 1, 300 epochs
at 224 px, Inception crop + flip, then RandAugment; ImageNet-21k with sigmoid
cross-entropy and the head bias at -10. big_vision's `wd` (1e-4, multiplied by the
schedule only) is written here as AdamW's lr-coupled decay: 0.1 at lr 1e-3 is the same.

Differences from big_vision: its RandAugment list has Cutout (ours is opt-in:
--config.pp.randaugment_ops), its i1k runs hold out train[99%:] as minival (here the
validation split is the eval split), and its i1k model has a pre-logits layer
(representation size = width) and i21k uses GAP pooling: here the model config is the
registry's ViT-S_16 / ViT-B_16 (class token, no pre-logits) so that the checkpoints load
and fine-tune like the paper's.
"""

from configs import common

# setting -> (RandAugment (num_ops, magnitude) or None, Mixup alpha); paper Fig. 4 and
# big_vision's RANDAUG_DEF / MIXUP_DEF (whose mixup 'p' is the Beta alpha).
AUG_SETTINGS = {
    "none": (None, 0.0),
    "light1": ((2, 0), 0.0),
    "light2": ((2, 10), 0.2),
    "medium1": ((2, 15), 0.2),
    "medium2": ((2, 15), 0.5),
    "strong1": ((2, 20), 0.5),
    "strong2": ((2, 20), 0.8),
}
ALIASES = {"light": "light1", "medium": "medium1", "strong": "strong1"}

MODELS = {"S/16": "ViT-S_16", "B/16": "ViT-B_16"}
DATASETS = ("imagenet2012", "imagenet21k")

# (model, dataset) -> (setting, weight decay, dropout, stochastic depth) of the released
# checkpoints, e.g. B_16-i1k-300ep-lr_0.001-aug_medium2-wd_0.1-do_0.1-sd_0.1.
PUBLISHED = {
    ("S/16", "imagenet2012"): ("medium2", 0.1, 0.0, 0.0),
    ("B/16", "imagenet2012"): ("medium2", 0.1, 0.1, 0.1),
    ("S/16", "imagenet21k"): ("light1", 0.03, 0.0, 0.0),
    ("B/16", "imagenet21k"): ("medium1", 0.1, 0.0, 0.0),
}


def parse_arg(arg):
  """'B/16,imagenet2012[,medium2]' -> (model, dataset, setting or None)."""
  parts = [p.strip() for p in (arg or "B/16,imagenet2012").split(",") if p.strip()]
  usage = ("Config argument should be MODEL,DATASET[,SETTING] with MODEL in "
           f"{sorted(MODELS)}, DATASET in {DATASETS}, SETTING in {sorted(AUG_SETTINGS)} or "
           f"{sorted(ALIASES)} (e.g. --config=configs/augreg.py:S/16,imagenet21k,light1)")
  if len(parts) not in (2, 3):
    raise ValueError(f"{usage}; got {arg!r}.")
  model, dataset = parts[0], parts[1]
  setting = ALIASES.get(parts[2], parts[2]) if len(parts) == 3 else None
  if model not in MODELS or dataset not in DATASETS or (
      setting is not None and setting not in AUG_SETTINGS):
    raise ValueError(f"{usage}; got {arg!r}.")
  return model, dataset, setting


def get_config(arg=None):
  model, dataset, setting = parse_arg(arg)
  published, wd, dropout, sd = PUBLISHED[(model, dataset)]
  c = common.pretrain(MODELS[model], dataset, epochs=300)
  c.optimizer, c.lr, c.b1, c.b2, c.weight_decay = "adam", 1e-3, 0.9, 0.999, wd
  c.schedule, c.warmup_steps, c.grad_clip_norm = "cosine", 10_000, 1.0
  c.model.dropout_rate, c.model.stochastic_depth = dropout, sd
  c.pp.eval_mode = "resize_crop"  # Resize 256, central crop 224, as big_vision.
  randaugment, mixup = AUG_SETTINGS[setting or published]
  c.pp.randaugment = randaugment
  c.mixup_alpha = mixup
  return c
