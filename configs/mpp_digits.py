"""Masked patch prediction (ViT paper, App. B.1.2) on scikit-learn's digits: a recipe.

Self-supervised pre-training of configs/default.py's ViT (16 px images, 4 x 4 patches,
width 64, 4 layers), then fine-tuning of its encoder with the default job:

  python -m vit_jax.main --config=configs/mpp_digits.py --workdir=workdir/mpp
  python -m vit_jax.main --config=configs/default.py --workdir=workdir/mpp_ft \
      --config.init_from=workdir/mpp

`config.objective = "mpp"` makes the trainer run MPP (vit_jax/training/objectives/mpp.py):
its evaluation reports the colour accuracy on the corrupted patches and it exports the
encoder's parameters. The same in a hand-written loop:

  config = mpp_digits.get_config()
  mesh = parallel.mesh.make_mesh(config.mesh)
  objective = objectives.get(config)
  model = objective.create_model(config, None)
  state, shardings = state_lib.create_train_state(
      model, optim.make_optimizer(config), mesh, rng=config.seed,
      **state_lib.layout_options(config))
  step_fn = objectives.make_train_step(objective, config, model, mesh, shardings)
  batches = data.make_train_iterator(config, seed=config.seed)
  for _ in range(config.total_steps):
    state, metrics = step_fn(state, data.to_global(next(batches), mesh))
  checkpoints.save_npz("mpp_vit.npz", state.params["vit"])  # For --config.init_from.

config.mpp holds the corruption: rate 0.5 of the patches, of which mask_frac 0.8 get the
mask token, random_frac 0.1 another patch's embedding, the rest are kept; targets are
`bits` = 3 per channel. The digits are grey (replicated to RGB), so only the 8 grey
classes on the colour cube's diagonal occur. Optimiser as in the paper (Adam, cosine
decay after a linear warm-up; the paper uses lr 2e-4 and 10k warm-up steps at batch 4096),
with the warm-up and length scaled to this small set; the values are not tuned.
"""

from configs import default


def get_config(arg=None):
  c = default.get_config(arg)
  c.objective = "mpp"
  c.mpp.rate, c.mpp.mask_frac, c.mpp.random_frac, c.mpp.bits = 0.5, 0.8, 0.1, 3
  c.pp.area_range = (0.6, 1.0)
  c.optimizer, c.lr, c.b1, c.b2, c.weight_decay = "adam", 1e-3, 0.9, 0.999, 1e-4
  c.schedule, c.warmup_steps, c.total_steps = "cosine", 200, 2000
  c.grad_clip_norm = 1.0
  c.accum_steps = 1  # The MPP step has no gradient accumulation.
  c.init_from = None
  return c
