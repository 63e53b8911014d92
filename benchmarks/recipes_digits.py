"""Does RandAugment + Mixup, or an EMA of the weights, help on a small real training set?

  PYTHONPATH=. python benchmarks/recipes_digits.py [--steps 500] [--seeds 0,1,2] [--out DIR]

Trains the default digits job (configs/default.py: the 4-layer ViT-digits_4, 16 px) on
train[:25%] (359 images) for --steps steps, 3 seeds each, in two settings:
  baseline       the default job's Inception crop only
  RA + Mixup     plus RandAugment (2, 10) and Mixup alpha 0.2 (AugReg's 'light2')
Every run keeps an EMA of the weights (decay 0.99; it does not change training), so each
run reports test accuracy (all 360 test images) with the raw and with the EMA weights.
Prints a Markdown table of mean +- std over the seeds, and the per-seed numbers.
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SETTINGS = {
    "baseline": dict(),
    "RA + Mixup": dict(randaugment=(2, 10), mixup_alpha=0.2),
}


def _config(steps, seed, randaugment=None, mixup_alpha=0.0):
  from configs import default  # pylint: disable=g-import-not-at-top
  c = default.get_config()
  c.train_split = "train[:25%]"
  c.total_steps, c.seed = steps, seed
  c.warmup_steps = min(c.warmup_steps, steps // 5)
  c.eval_every = 0  # Only at the end.
  c.log_every, c.checkpoint_every = steps, steps
  c.plots = False
  c.ema_decay = 0.99
  c.pp.randaugment = randaugment
  c.mixup_alpha = mixup_alpha
  return c


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--steps", type=int, default=500)
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--out", default=None, help="workdirs (default: a temporary dir)")
  args = parser.parse_args(argv)
  from vit_jax.perf import machine  # pylint: disable=g-import-not-at-top
  from vit_jax.training import loop  # pylint: disable=g-import-not-at-top
  print(machine.describe())
  seeds = [int(s) for s in args.seeds.split(",")]
  out = args.out or tempfile.mkdtemp(prefix="recipes_digits_")
  results = {}
  for name, options in SETTINGS.items():
    for seed in seeds:
      workdir = os.path.join(out, f"{name.replace(' ', '').replace('+', '_')}_{seed}")
      start, cpu = time.perf_counter(), time.process_time()
      summary = loop.train_and_evaluate(_config(args.steps, seed, **options), workdir)
      from vit_jax.training import reporting  # pylint: disable=g-import-not-at-top
      last = [r for r in reporting.read_metrics(workdir) if r["kind"] == "eval"][-1]
      results.setdefault(name, []).append((last["accuracy"], last["ema/accuracy"]))
      print(f"{name}, seed {seed}: accuracy {last['accuracy']:.4f}, ema/accuracy "
            f"{last['ema/accuracy']:.4f} ({time.perf_counter() - start:.0f} s wall, "
            f"{time.process_time() - cpu:.0f} CPU-s); step {summary['step']}", flush=True)
  print(f"\n| digits train[:25%], {args.steps} steps, {len(seeds)} seeds | raw weights | "
        "EMA 0.99 |\n|---|---|---|")
  for name, rows in results.items():
    raw, ema = np.asarray(rows).T * 100
    print(f"| {name} | {raw.mean():.1f} +- {raw.std():.1f} % | {ema.mean():.1f} +- "
          f"{ema.std():.1f} % |")


if __name__ == "__main__":
  main()
