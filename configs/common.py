"""Shared pieces of the training configs: every field the trainer reads, and the recipes.

`get_config()` returns all fields with neutral defaults; `finetune(...)` and `pretrain(...)`
apply the paper's recipes (Dosovitskiy et al. 2021, Sec. 4.1 and App. B.1) for a model and
dataset. The per-model files (`vit_b16.py`, ...) only pick the model and call these.
"""

import ml_collections
from ml_collections import config_dict

from vit_jax import models

# Training-split sizes, for turning epochs into steps.
TRAIN_SIZES = {
    "cifar10": 50_000,
    "cifar100": 50_000,
    "oxford_iiit_pet": 3_680,
    "oxford_flowers102": 1_020,
    "imagenet2012": 1_281_167,
    "imagenet21k": 12_743_321,
    "digits": 1_437,
}

# Fine-tuning steps per dataset (paper, Table 4; ImageNet 20k, CIFAR 10k, small sets 500).
FINETUNE_STEPS = {
    "cifar10": 10_000,
    "cifar100": 10_000,
    "oxford_iiit_pet": 500,
    "oxford_flowers102": 500,
    "imagenet2012": 20_000,
}

# The evaluation split each dataset publishes (tfds names).
EVAL_SPLITS = {"imagenet2012": "validation", "oxford_flowers102": "test"}

# Pre-training learning rates per model size (paper, Table 3, Adam, batch 4096).
PRETRAIN_LR = {"B": 1e-3, "L": 4e-4, "H": 3e-4}

# Sizes that need FSDP and scan+remat to fit a fine-tuning batch on 16-80 GB devices.
LARGE_MODELS = ("ViT-L_16", "ViT-L_32", "ViT-H_14", "R50+ViT-L_32")


def get_config() -> ml_collections.ConfigDict:
  """Every field the trainer, train step and data pipeline read, with neutral defaults."""
  c = ml_collections.ConfigDict()
  # The image resolution is one value shared by the data pipeline and the model, so that
  # `--config.pp.crop=384` (or `--config.model.image_size=384`) changes both.
  crop = config_dict.FieldReference(224)

  c.model = models.get_config("ViT-B_16")
  c.model.image_size = crop
  c.num_classes = config_dict.placeholder(int)  # None: the dataset's number of classes.
  c.init_from = config_dict.placeholder(str)  # None: from scratch; else .npz / Orbax dir / workdir.
  c.resample_posemb = "zoom"  # How position embeddings are resized when init_from's grid differs.
  c.seed = 0
  # What is learned (vit_jax/training/objectives): 'classification' | 'mpp' (masked patch
  # prediction, self-supervised; its corruption in c.mpp).
  c.objective = "classification"
  c.mpp = ml_collections.ConfigDict(dict(rate=0.5, mask_frac=0.8, random_frac=0.1, bits=3))

  # Data (see vit_jax/data).
  c.dataset = "digits"
  c.data_dir = config_dict.placeholder(str)
  c.train_split = "train"
  c.eval_split = "test"
  c.batch_size = 512  # Global, over all devices and processes.
  c.eval_batch_size = 512  # None: the same as batch_size.
  c.data_workers = 0  # grain worker processes; 0 = threads in the training process.
  c.data_threads = 2
  c.prefetch = 2  # Batches placed on the devices ahead of the step.
  c.pp = ml_collections.ConfigDict()
  c.pp.crop = crop
  c.pp.eval_mode = "resize"  # 'resize' | 'resize_crop'
  c.pp.area_range = (0.05, 1.0)  # Inception crop area range for training.
  c.pp.flip = True
  c.pp.skip_corrupt = False

  # Optimisation (see vit_jax/training/optim.py and vit_jax/training/objectives).
  c.total_steps = 10_000
  c.warmup_steps = 500
  c.optimizer = "sgd"  # 'sgd' | 'adam'
  c.lr = 0.03
  c.momentum = 0.9
  c.b1 = 0.9
  c.b2 = 0.999
  c.weight_decay = 0.0  # Decoupled (AdamW-style), multiplied by the learning rate lr(t).
  c.grad_clip_norm = 1.0
  c.schedule = "cosine"  # 'cosine' | 'linear' decay after the linear warm-up.
  c.loss = "softmax_xent"  # 'softmax_xent' | 'sigmoid_xent'
  c.label_smoothing = 0.0
  c.accum_steps = 1  # Gradient accumulation micro-batches per step (for memory).

  # Devices.
  # (axis, size) pairs; -1 = the remaining devices. On the command line:
  # --config.mesh="(('data', 4), ('model', 2))".
  c.mesh = (("data", -1),)
  c.fsdp = False  # Shard parameters and optimizer state over the batch axes too.
  c.fsdp_min_size = 2**14  # Parameters with fewer elements stay replicated under FSDP.
  # Multi-host (see vit_jax/parallel/distributed.py): mode 'auto' initialises when the
  # environment shows a multi-process job (SLURM, Open MPI, JAX_COORDINATOR_ADDRESS, a
  # multi-worker Cloud TPU); 'on' always calls jax.distributed.initialize; 'off' never.
  # An explicit coordinator_address needs num_processes and process_id too.
  c.distributed = ml_collections.ConfigDict()
  c.distributed.mode = "auto"
  c.distributed.coordinator_address = config_dict.placeholder(str)
  c.distributed.num_processes = config_dict.placeholder(int)
  c.distributed.process_id = config_dict.placeholder(int)

  # Loop, checkpoints and reporting.
  c.log_every = 50
  c.eval_every = 1000  # Also evaluated at the end; 0 = only at the end.
  c.checkpoint_every = 1000
  c.keep_checkpoints = 3  # The newest k, plus the best by eval accuracy.
  c.async_checkpoint = True
  c.preemption_sync_every = 10  # Multi-host: steps between agreeing on a SIGTERM.
  c.progress_bar = False  # True: a tqdm bar instead of one line per log_every steps.
  c.plots = True  # PNG loss/accuracy curves in the workdir at the end.

  # A workdir that survives its users (vit_jax/training/config_history.py, lock.py).
  # Fields fixed by a checkpoint (model.*, batch_size, dataset, seed, ...) allowed to change
  # on resume, comma-separated, e.g. "model.dropout_rate,batch_size"; "" = none.
  c.allow_config_change = ""
  c.lock_stale_after_s = 600.0  # A lock whose heartbeat is older is taken over.
  c.lock_heartbeat_s = 30.0  # How often a run rewrites its lock's heartbeat.
  # Patch-size change when fine-tuning (FlexiViT, checkpoints.load_pretrained): how the
  # init_from embedding kernel is resized when its patch size differs from the model's.
  # None: a different patch size is an error; 'pinv' (PI-resize) or 'bilinear'.
  c.patch_resize = config_dict.placeholder(str)
  # Training recipes (RandAugment, Mixup/CutMix, EMA, layer-wise lr decay, evaluators;
  # see README "Recipes"). Every one is off by default.
  # RandAugment (vit_jax/data/randaugment.py) after the crop and flip: (num_ops,
  # magnitude in [0, 30]), e.g. --config.pp.randaugment="(2, 15)"; None = off.
  c.pp.randaugment = config_dict.placeholder(tuple)
  c.pp.randaugment_ops = config_dict.placeholder(tuple)  # Op names; None = the 15 default.
  c.pp.randaugment_magnitude_std = 0.0  # timm's magnitude noise per op (DeiT: 0.5); 0 = off.
  c.pp.random_erase = 0.0  # Chance per image of erasing a rectangle (DeiT: 0.25); 0 = off.
  c.pp.repeated_aug = 1  # Copies of each example per epoch, each augmented (DeiT: 3).
  c.mixup_alpha = 0.0  # Beta(alpha, alpha) Mixup of each batch on the device; 0 = off.
  c.cutmix_alpha = 0.0  # CutMix likewise; with both on, each mixed batch picks one.
  c.mix_prob = 1.0  # The chance that a batch is mixed at all.
  c.mix_switch_prob = 0.5  # Both on: the chance a mixed batch uses CutMix.
  c.ema_decay = 0.0  # EMA of the parameters (e.g. 0.9999); 0 = off.
  c.export_ema = False  # With EMA: export the EMA parameters to params/ instead.
  c.layer_decay = 1.0  # Layer-wise lr decay in (0, 1] (BEiT/MAE fine-tuning); 1 = off.
  # Extra evaluations during training, as named entries (vit_jax/training/evaluators.py).
  # A config file adds them, e.g. c.evals.fewshot = common.fewshot_eval("digits", every=250);
  # the command line then changes their fields: --config.evals.fewshot.every=500.
  c.evals = ml_collections.ConfigDict()
  c.best_metric = "accuracy"  # The eval metric (by name) that picks the best checkpoint.
  # Published weights (vit_jax/checkpoints/published.py): where init_from names such as
  # 'i21k:ViT-B_16' or 'augreg:B_16' are looked up.
  c.pretrained_root = "gs://vit_models"
  return c


def classification_eval(dataset: str, split: str, every: int = 1000,
                        data_dir=None) -> ml_collections.ConfigDict:
  """An evals entry: top-1/top-5 accuracy and loss on `dataset`'s `split`, every N steps.

  The dataset must have the training dataset's classes (e.g. imagenet_v2 for imagenet2012).
  """
  return ml_collections.ConfigDict(dict(
      kind="classification", every=every, dataset=dataset, split=split,
      data_dir=config_dict.placeholder(str) if data_dir is None else data_dir))


def fewshot_eval(datasets, every: int = 1000, shots=(1, 5, 10, 25),
                 regs=(2.0**-10, 2.0**-5, 1.0, 2.0**5, 2.0**10), seeds=(0, 1, 2),
                 train_split: str = "train", test_split: str = "test",
                 data_dir=None) -> ml_collections.ConfigDict:
  """An evals entry: few-shot linear probes (closed-form ridge) on frozen pre-logits.

  datasets: one name or a comma-separated list ('digits' or 'cifar10,oxford_iiit_pet');
  for each, `shots` examples per class drawn from `train_split` with each of `seeds`,
  every ridge strength of `regs` fitted, the best mean accuracy on `test_split` reported.
  """
  if not isinstance(datasets, str):
    datasets = ",".join(datasets)
  return ml_collections.ConfigDict(dict(
      kind="fewshot", every=every, datasets=datasets, shots=tuple(shots),
      regs=tuple(float(r) for r in regs), seeds=tuple(seeds), train_split=train_split,
      test_split=test_split,
      data_dir=config_dict.placeholder(str) if data_dir is None else data_dir))


def model_size(model_name: str) -> str:
  """'B' for 'ViT-B_16' or 'R50+ViT-B_16'."""
  return model_name.split("ViT-")[1].split("_")[0]


def _set_model(c, model_name):
  crop = c.pp.get_ref("crop")
  c.model = models.get_config(model_name)
  c.model.image_size = crop
  if model_name in LARGE_MODELS:
    c.fsdp = True
    c.model.scan = True
    c.model.remat_policy = "nothing_saveable"


def finetune(model_name: str, dataset: str) -> ml_collections.ConfigDict:
  """Paper fine-tuning: SGD momentum 0.9, no weight decay, batch 512, warm-up 500 then cosine,
  global-norm clip 1, 384 px, from the ImageNet-21k checkpoint with a fresh zero head."""
  if dataset not in FINETUNE_STEPS:
    raise ValueError(f"No fine-tuning recipe for dataset {dataset!r}; choose one of "
                     f"{sorted(FINETUNE_STEPS)} (or edit the config's fields).")
  c = get_config()
  _set_model(c, model_name)
  c.dataset = dataset
  c.eval_split = EVAL_SPLITS.get(dataset, "test")
  c.pp.crop = 384
  c.optimizer, c.lr, c.momentum, c.weight_decay = "sgd", 0.03, 0.9, 0.0
  c.batch_size = c.eval_batch_size = 512
  c.schedule, c.warmup_steps, c.grad_clip_norm = "cosine", 500, 1.0
  c.total_steps = FINETUNE_STEPS[dataset]
  c.eval_every = c.checkpoint_every = max(100, c.total_steps // 10)
  c.log_every = 50 if c.total_steps >= 1000 else 10
  # The published ImageNet-21k checkpoint, e.g. fetched with
  # `gsutil cp gs://vit_models/imagenet21k/ViT-B_16.npz pretrained/imagenet21k/`.
  c.init_from = f"pretrained/imagenet21k/{model_name}.npz"
  return c


def pretrain(model_name: str, dataset: str = "imagenet2012",
             epochs: int | None = None) -> ml_collections.ConfigDict:
  """Paper pre-training: Adam (0.9, 0.999), decoupled weight decay 0.1, batch 4096,
  linear warm-up of 10k steps then linear decay, global-norm clip 1, 224 px, from scratch."""
  c = get_config()
  _set_model(c, model_name)
  c.dataset = dataset
  c.eval_split = EVAL_SPLITS.get(dataset, "test")
  c.pp.crop = 224
  c.optimizer, c.b1, c.b2, c.weight_decay = "adam", 0.9, 0.999, 0.1
  c.lr = PRETRAIN_LR.get(model_size(model_name), 1e-3)
  c.batch_size = c.eval_batch_size = 4096
  c.schedule, c.warmup_steps, c.grad_clip_norm = "linear", 10_000, 1.0
  epochs = epochs or (90 if dataset == "imagenet21k" else 300)
  c.total_steps = TRAIN_SIZES.get(dataset, 1_281_167) * epochs // c.batch_size
  c.eval_every = c.checkpoint_every = 5_000
  c.log_every = 100
  c.init_from = None
  if dataset == "imagenet21k":
    # Multi-label: the i21k runs used sigmoid cross-entropy with the head bias at -10.
    c.loss = "sigmoid_xent"
    c.model.head_bias_init = -10.0
  return c


def recipe(model_name: str, arg: str | None) -> ml_collections.ConfigDict:
  """Parses a config-file argument 'DATASET' or 'DATASET,pretrain' (default cifar10)."""
  parts = [p.strip() for p in (arg or "cifar10").split(",") if p.strip()]
  dataset = parts[0] if parts else "cifar10"
  mode = parts[1] if len(parts) > 1 else ("pretrain" if dataset == "imagenet21k" else "finetune")
  if len(parts) > 2 or mode not in ("finetune", "pretrain"):
    raise ValueError(f"Config argument {arg!r} should be 'DATASET' or 'DATASET,pretrain' "
                     "(e.g. --config=configs/vit_b16.py:cifar100 or "
                     "--config=configs/vit_b16.py:imagenet2012,pretrain).")
  return pretrain(model_name, dataset) if mode == "pretrain" else finetune(model_name, dataset)
