"""Short runs for the paper's ablations at small scale (README, "Reproducing the paper").

  --config=configs/paper_ablation.py          the embedded digits (16 px, patch 4)
  --config=configs/paper_ablation.py:crops    grey 32 px crops of scikit-image's photos
                                              (docs/ablations/make_skimage_crops.py builds
                                              them in ./data/skimage_crops; patch 8)

The default digits job (configs/default.py: width 64, 4 layers, 4 heads, Adam 2e-3,
cosine) cut to 300 steps, evaluated once at the end; sweep it with `python -m
vit_jax.ablate`, e.g. --sweep=model.posemb=learn,learn_2d,relative,sincos2d,none.
"""

from configs import default

DATASETS = ("digits", "crops")
CROPS_ROOT = "./data/skimage_crops"


def get_config(arg=None):
  dataset = (arg or "digits").strip()
  if dataset not in DATASETS:
    raise ValueError(f"configs/paper_ablation.py:{arg}: choose one of {DATASETS}.")
  c = default.get_config()
  c.total_steps, c.warmup_steps = 300, 30
  c.log_every, c.eval_every, c.checkpoint_every = 100, 0, 300
  c.keep_checkpoints = 1
  c.plots = False
  if dataset == "crops":
    c.dataset = CROPS_ROOT
    c.pp.crop = 32
    c.model.patch_size = 8
    c.model.name = "ViT-crops_8"
    c.pp.area_range = (0.5, 1.0)
    c.pp.flip = True
    c.eval_batch_size = 400
  return c
