"""Command line: `python -m vit_jax.main [--config=configs/X.py[:ARG]] [--workdir=DIR]
[--config.FIELD=VALUE ...]`.

Without --config it runs the embedded default job (a small ViT on the digits dataset) in
./workdir/default. Every config field can be overridden, e.g.
`--config.model.patch_size=32 --config.batch_size=256`; see configs/common.py for the fields.
Rerunning the same command resumes from the newest checkpoint in the workdir.

Exit status: 0 finished; 75 preempted (SIGTERM: a checkpoint was saved, rerun to resume;
launch/ scripts restart or requeue on it); 1 a bad input, a workdir in use or a diverged
run (one message on stderr; VIT_JAX_TRACEBACK=1 or --verbosity=1 adds the traceback);
2 a bad flag or config file.
"""

import importlib.util
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from vit_jax.cli import errors as cli_errors
from vit_jax.parallel import cpu_devices
from vit_jax.training import preemption

# Equal to training.loop.PREEMPTED_EXIT_CODE (checked by a test); defined here too so
# that main need not import the trainer before the SIGTERM handler is in place.
PREEMPTED_EXIT_CODE = 75

CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "configs")
DEFAULT_CONFIG = os.path.join(CONFIGS_DIR, "default.py")

_CONFIG = None
_WORKDIR = None


def _define_flags():
  """Defines --config and --workdir (config_flags reads the overrides from sys.argv)."""
  global _CONFIG, _WORKDIR
  if "config" in flags.FLAGS:
    return
  _CONFIG = config_flags.DEFINE_config_file(
      "config", DEFAULT_CONFIG, "Training config file (configs/*.py), optionally with an "
      "argument after ':', e.g. configs/vit_b16.py:cifar100.", lock_config=True)
  _WORKDIR = flags.DEFINE_string(
      "workdir", None, "Directory for checkpoints, metrics and plots (default: "
      "./workdir/<config file name>). An existing one is resumed.")


def config_argument(argv) -> str:
  """The --config value in `argv` (last one wins), or the default config file.

  Only to explain a flag error: when parsing succeeds config_flags knows the value.
  """
  value = DEFAULT_CONFIG
  for i, arg in enumerate(argv[1:], start=1):
    if arg.startswith("--config="):
      value = arg.split("=", 1)[1]
    elif arg == "--config" and i + 1 < len(argv):
      value = argv[i + 1]
  return value


def load_config(spec: str):
  """`path[:arg]` -> that file's get_config(arg); ValueError if the file is missing."""
  path, sep, arg = spec.partition(":")
  if not os.path.isfile(path):
    available = sorted(n for n in os.listdir(CONFIGS_DIR) if n.endswith(".py")
                       and n != "__init__.py") if os.path.isdir(CONFIGS_DIR) else []
    raise ValueError(f"--config={spec}: config file {path!r} does not exist. Config files "
                     f"in {CONFIGS_DIR}: {', '.join(available)}.")
  module_spec = importlib.util.spec_from_file_location("_vit_jax_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if sep else module.get_config()


def check_overrides(argv, config) -> None:
  """ValueError naming the first --config.a.b override whose field does not exist."""
  for arg in argv[1:]:
    for prefix in ("--config.", "--noconfig."):
      if arg.startswith(prefix):
        _check_path(arg[len(prefix):].split("=", 1)[0], config)


def _check_path(path: str, config) -> None:
  node, walked = config, "config"
  for key in path.split("."):
    if not hasattr(node, "keys") or key not in node.keys():
      fields = sorted(node.keys()) if hasattr(node, "keys") else []
      hint = f" Fields of {walked}: {', '.join(fields)}." if fields else \
          f" {walked} is a value, not a group of fields."
      raise ValueError(f"--config.{path}: the config has no field {walked}.{key}.{hint}")
    node, walked = node[key], f"{walked}.{key}"


def _explain_flag_error(argv, error) -> str:
  """The message for a failed flag parse: the file or field that is wrong, and why."""
  try:
    check_overrides(argv, load_config(config_argument(argv)))
  except ValueError as e:
    return str(e)
  return str(error)


def parse_flags(argv):
  """absl's flag parsing, with a one-line message (exit 2) for a bad --config or field."""
  try:
    _define_flags()  # config_flags applies the overrides in sys.argv already here.
    remaining = flags.FLAGS(argv)
    _CONFIG.value.keys()  # A config file that failed to load raises only when used.
    return remaining
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError) as e:
    # config_flags raises these for a missing file, a field that does not exist or a
    # value of the wrong type.
    cli_errors.report(ValueError(_explain_flag_error(argv, e)), argv)
    sys.exit(2)


def default_workdir(config_spec: str) -> str:
  """./workdir/default for configs/default.py; ./workdir/vit_b16_cifar100 for vit_b16.py:cifar100."""
  path, _, arg = config_spec.partition(":")
  name = os.path.splitext(os.path.basename(path))[0]
  if arg:
    name += "_" + "_".join(p.strip() for p in arg.split(",") if p.strip())
  return os.path.join(".", "workdir", name)


def main(argv) -> int:
  """Trains the parsed config; returns the exit status (see the module docstring)."""
  preemption.install()  # First: a SIGTERM from here on is honoured, never a crash.
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments {argv[1:]}; config fields are set with "
                         "--config.FIELD=VALUE.")
  if preemption.requested():
    print("Preemption (SIGTERM) before start: nothing done.", file=sys.stderr, flush=True)
    return PREEMPTED_EXIT_CODE
  cpu_devices.configure_cpu_devices()  # Before anything initialises the JAX backends.
  if not flags.FLAGS["verbosity"].present:
    # Orbax logs hundreds of INFO lines per run; progress is printed on stdout anyway.
    logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value
  spec = config_flags.get_config_filename(flags.FLAGS["config"])
  workdir = _WORKDIR.value or default_workdir(spec)
  from vit_jax import storage  # pylint: disable=g-import-not-at-top
  try:
    print(f"Config {spec}, workdir {os.fspath(storage.as_path(workdir))}", flush=True)
    from vit_jax.parallel import distributed  # pylint: disable=g-import-not-at-top
    from vit_jax.training import loop  # pylint: disable=g-import-not-at-top
    distributed.initialize_distributed(config)
    preemption.install()  # Again: jax.distributed may have put its own handler in place.
    summary = loop.train_and_evaluate(config, workdir)
  except Exception as e:  # pylint: disable=broad-except
    return _exit_status(e)
  return PREEMPTED_EXIT_CODE if summary["preempted"] else 0


def _exit_status(error: Exception) -> int:
  """One message for an input error or a preempted start-up; a bug is re-raised."""
  from vit_jax import data  # pylint: disable=g-import-not-at-top
  from vit_jax import storage  # pylint: disable=g-import-not-at-top
  from vit_jax.training import lock  # pylint: disable=g-import-not-at-top
  from vit_jax.training import loop  # pylint: disable=g-import-not-at-top
  if isinstance(error, loop.PreemptedError):
    print(str(error), file=sys.stderr, flush=True)
    return PREEMPTED_EXIT_CODE
  expected = cli_errors.INPUT_ERRORS + (data.DataError, storage.StorageError,
                                        lock.WorkdirLockedError,
                                        loop.TrainingDivergedError)
  if not isinstance(error, expected):
    raise error
  # Bad input, a workdir in use or a diverged run: the message says what to do.
  cli_errors.report(error)
  return 1


def run():
  """Entry point: parses the flags (one message for a bad config or field), then trains."""
  preemption.install()
  app.run(lambda argv: sys.exit(main(argv)), flags_parser=parse_flags)


if __name__ == "__main__":
  run()
