"""`python -m vit_jax.main`: flags, config-file errors, the output a person reads, exit codes."""

import os
import re
import subprocess
import sys

import pytest

from trainer_fixtures import CONFIGS, REPO, TINY_FLAGS, as_flags
from vit_jax import main
from vit_jax.training import reporting

TIMEOUT = 180


def _run(args, cwd, devices=None):
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # Let main pick the device count, as a user's shell would.
  if devices:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["PYTHONPATH"] = os.pathsep.join([REPO, env.get("PYTHONPATH", "")])
  return subprocess.run([sys.executable, "-m", "vit_jax.main", *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=TIMEOUT, check=False)


def test_default_workdir_names():
  assert main.default_workdir(f"{CONFIGS}/default.py") == os.path.join(".", "workdir", "default")
  assert main.default_workdir("configs/vit_b16.py:cifar100") == \
      os.path.join(".", "workdir", "vit_b16_cifar100")
  assert main.default_workdir("configs/vit_l16.py:imagenet2012,pretrain") == \
      os.path.join(".", "workdir", "vit_l16_imagenet2012_pretrain")


def test_config_argument_is_found_in_argv():
  assert main.config_argument(["main"]) == main.DEFAULT_CONFIG
  assert main.config_argument(["main", "--config=a.py:x", "--config.lr=1"]) == "a.py:x"
  assert main.config_argument(["main", "--config", "b.py"]) == "b.py"


def test_unknown_override_names_the_field_and_lists_the_valid_ones():
  config = main.load_config(f"{CONFIGS}/vit_b16.py:cifar10")
  main.check_overrides(["main", "--config.model.patch_size=32", "--noconfig.fsdp",
                        "--config.pp.crop", "384"], config)
  with pytest.raises(ValueError, match=r"--config.model.patchsize: the config has no field "
                     r"config.model.patchsize. Fields of config.model: .*patch_size"):
    main.check_overrides(["main", "--config.model.patchsize=32"], config)
  with pytest.raises(ValueError, match=r"no field config.lr.x. config.lr is a value"):
    main.check_overrides(["main", "--config.lr.x=1"], config)


def test_missing_config_file_lists_the_config_files():
  with pytest.raises(ValueError, match=r"config file 'configs/vit_b17.py' does not exist.*"
                     r"vit_b16.py"):
    main.load_config("configs/vit_b17.py:cifar10")


def test_bad_input_exits_with_a_message_not_a_traceback(tmp_path):
  result = _run(["--config.model.patchsize=8"], cwd=tmp_path)
  assert result.returncode == 2
  assert "Error: --config.model.patchsize: the config has no field" in result.stderr
  assert "Traceback" not in result.stderr

  missing = tmp_path / "ViT-B_16.npz"
  result = _run([f"--workdir={tmp_path / 'run'}", f"--config.init_from={missing}"], cwd=tmp_path)
  assert result.returncode == 1
  assert f"Error: config.init_from='{missing}' does not exist" in result.stderr
  assert "Traceback" not in result.stderr
  assert not (tmp_path / "run").exists()


def test_short_run_prints_progress_and_summary(tmp_path):
  """No --workdir: ./workdir/default under the current directory; one device per core."""
  flags = dict(TINY_FLAGS, total_steps=10, log_every=5, eval_every=0, checkpoint_every=10,
               plots=True)
  result = _run(as_flags(flags), cwd=tmp_path)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
  out = result.stdout
  workdir = tmp_path / "workdir" / "default"
  assert f"workdir {workdir}" in out
  cores = len(os.sched_getaffinity(0))  # main's configure_cpu_devices(): one per core.
  assert f"{cores} cpu devices, mesh {{'data': {cores}}}" in out
  progress = re.findall(r"^step +(\d+)/10 \| loss (\S+) \| lr (\S+) \| (\d+) img/s \| "
                        r"ETA (\d+:\d\d:\d\d)$", out, re.M)
  assert [int(p[0]) for p in progress] == [5, 10]
  assert re.search(r"^eval test @ step 10: accuracy 0\.\d+ \| accuracy_top5 ", out, re.M)
  assert "Done: 10 steps in" in out and f"final parameters: {workdir / 'params'}" in out
  records = reporting.read_metrics(str(workdir))
  assert [r["step"] for r in records if r["kind"] == "train"] == [5, 10]
  assert {"loss", "learning_rate", "grad_norm", "images_per_sec"} <= set(records[0])
  for name in ("config.json", "config.yaml", "loss.png", "accuracy.png", "params"):
    assert (workdir / name).exists(), name
