"""Train an ablation grid and tabulate it.

  python -m vit_jax.ablate --config=configs/X.py[:ARG] --sweep=FIELD=V1,V2,... [--sweep=...]
      [--seeds=3] --workdir=DIR [--report] [--config.FIELD=VALUE ...]

Every combination of the swept values is trained `--seeds` times (config.seed = 0, 1,
...) as a normal trainer run in DIR/<field=value,...>/seed_<s>: interrupted runs resume,
finished ones are skipped. Then DIR/results.csv (one line per run), DIR/results.md (mean
+- std of the final test accuracy per variant, and n) and DIR/results.png (bars with
error bars) are written. `--report` only rebuilds these from the sub-workdirs. Values
parse as `--config.FIELD=...` overrides do: ints, floats, strings, tuples like (1,2).
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from vit_jax.parallel import cpu_devices

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "configs", "default.py")

FLAGS = flags.FLAGS
_CONFIG = config_flags.DEFINE_config_file("config", DEFAULT_CONFIG,
                                          "Base training config (configs/*.py[:ARG]).",
                                          lock_config=True)
flags.DEFINE_multi_string("sweep", [], "FIELD=V1,V2,...: a config field and its values; "
                          "repeat for a grid.")
flags.DEFINE_integer("seeds", 3, "Runs per variant (config.seed = 0 .. seeds-1).")
flags.DEFINE_string("workdir", None, "Directory of the grid (one sub-workdir per run).")
flags.DEFINE_bool("report", False, "Only rebuild results.{csv,md,png} from the sub-workdirs.")
flags.DEFINE_string("title", "", "Title of results.md and the plot.")


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments {argv[1:]}.")
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required.")
  if FLAGS.seeds < 1:
    raise app.UsageError("--seeds must be >= 1.")
  cpu_devices.configure_cpu_devices()  # Before anything initialises the JAX backends.
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  from vit_jax.evaluate import ablation  # pylint: disable=g-import-not-at-top
  config = _CONFIG.value
  try:
    sweeps = [ablation.parse_sweep(spec, config) for spec in FLAGS.sweep]
    ablation.check_sweeps(sweeps)
  except ValueError as e:
    print(f"Error: {e}", file=sys.stderr, flush=True)
    return 2
  seeds = list(range(FLAGS.seeds))
  if not FLAGS.report:
    ablation.run_grid(config, sweeps, seeds, FLAGS.workdir)
  report = ablation.write_report(FLAGS.workdir, sweeps, seeds, int(config.total_steps),
                                 FLAGS.title)
  print(open(report["md"], encoding="utf-8").read())
  print("results:", report["csv"], report["md"], report["png"], sep="\n  ")
  return 0


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)))
