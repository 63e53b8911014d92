"""launch/: the Cloud TPU CLI's exact gcloud commands, its remote shell, SLURM's mapping.

The TPU commands are compared token by token with command lines written out here from the
gcloud reference (`gcloud compute tpus tpu-vm create|scp|ssh|delete`); the remote shell
snippets run for real under bash, with a stand-in trainer package; the SLURM mapping is
checked on environments like those srun gives.
"""

import glob
import importlib.util
import inspect
import os
import pathlib
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time

import pytest

from vit_jax.parallel import slurm

ROOT = pathlib.Path(__file__).resolve().parents[1]
TPU_PY = ROOT / "launch" / "tpu.py"
SLICE = ["--name=vit-pod", "--zone=europe-west4-a"]
GCLOUD = "gcloud compute tpus tpu-vm"


def _load_tpu_module():
  spec = importlib.util.spec_from_file_location("launch_tpu", TPU_PY)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up there.
  spec.loader.exec_module(module)
  return module


tpu = _load_tpu_module()


@pytest.fixture(params=["subprocess", "in_process"])
def cli(request, capsys):
  """Runs `tpu.py ARGS` -> (exit status, stdout, stderr), as a child process or in-process."""
  def run(*args, env=None):
    if request.param == "subprocess":
      result = subprocess.run([sys.executable, str(TPU_PY), *args], capture_output=True,
                              text=True, cwd=ROOT, env=env, timeout=60, check=False)
      return result.returncode, result.stdout, result.stderr
    assert env is None, "in-process runs use monkeypatch for the environment"
    status = tpu.main(list(args))
    out, err = capsys.readouterr()
    return status, out, err
  return run


def _dry_run_lines(cli, *args) -> list[str]:
  status, out, err = cli(*args, "--dry-run")
  assert status == 0, err
  return out.splitlines()


# --------------------------------------------------------------------------- dry runs, v3-32

@pytest.mark.parametrize("capacity", ["--spot", "--reserved"])
def test_create_v3_32(cli, capacity):
  assert _dry_run_lines(cli, "create", *SLICE, "--accelerator-type=v3-32", capacity) == [
      f"{GCLOUD} create vit-pod --zone=europe-west4-a --accelerator-type=v3-32 "
      f"--version=tpu-ubuntu2204-base {capacity}"]


def test_create_runtime_versions_and_project(cli):
  """The JAX images of Google's runtime table: v4 and older, v5e, v5p, v6e; --version wins."""
  expected = {"v4-32": "tpu-ubuntu2204-base", "v5litepod-16": "v2-alpha-tpuv5-lite",
              "v5p-8": "v2-alpha-tpuv5", "v6e-8": "v2-alpha-tpuv6e"}
  for accelerator_type, version in expected.items():
    line, = _dry_run_lines(cli, "create", *SLICE, f"--accelerator-type={accelerator_type}")
    assert line.endswith(f"--accelerator-type={accelerator_type} --version={version}")
  line, = _dry_run_lines(cli, "create", *SLICE, "--project=my-project",
                         "--accelerator-type=v3-8", "--version=tpu-vm-base")
  assert line == (f"{GCLOUD} create vit-pod --zone=europe-west4-a --project=my-project "
                  "--accelerator-type=v3-8 --version=tpu-vm-base")


def test_setup_copies_this_checkout(cli):
  lines = _dry_run_lines(cli, "setup", *SLICE, "--archive=/tmp/src.tar.gz")
  assert lines[0].startswith(f"# pack {ROOT} into /tmp/src.tar.gz")
  assert lines[1] == (f"{GCLOUD} scp /tmp/src.tar.gz vit-pod:vit_jax_src.tar.gz "
                      "--zone=europe-west4-a --worker=all")
  assert shlex.split(lines[2]) == [
      "gcloud", "compute", "tpus", "tpu-vm", "ssh", "vit-pod", "--zone=europe-west4-a",
      "--worker=all",
      "--command=rm -rf vit_jax && mkdir -p vit_jax && "
      "tar -xzf vit_jax_src.tar.gz -C vit_jax && rm vit_jax_src.tar.gz && "
      'cd vit_jax && python3 -m pip install -q -U "jax[tpu]" -e .']
  assert len(lines) == 3


def test_setup_default_archive_is_in_the_temp_dir():
  _, steps = tpu.parse(["setup", *SLICE])
  assert steps[1][5] == os.path.join(tempfile.gettempdir(), "vit_jax_src.tar.gz")


def test_setup_from_git(cli):
  line, = _dry_run_lines(cli, "setup", *SLICE, "--repo=https://example.org/vit.git",
                         "--ref=v1.2")
  assert shlex.split(line)[-1] == (
      "--command={ [ -d vit_jax/.git ] || { rm -rf vit_jax && "
      "git clone -q https://example.org/vit.git vit_jax; }; } && "
      "git -C vit_jax fetch -q https://example.org/vit.git v1.2 && "
      "git -C vit_jax checkout -q --force FETCH_HEAD && "
      'cd vit_jax && python3 -m pip install -q -U "jax[tpu]" -e .')


TRAIN_ARGS = ["--accelerator-type=v3-32", "--config=configs/vit_b16.py:imagenet2012",
              "--workdir=gs://my-bucket/runs/b16", "--config.batch_size=1024"]
TRAINER = ("python3 -m vit_jax.main --config=configs/vit_b16.py:imagenet2012 "
           "--workdir=gs://my-bucket/runs/b16 --config.distributed.mode=on "
           "--config.batch_size=1024")
START_GUARD = ('if [ -e vit_jax_train.pid ] && kill -0 -- "-$(cat vit_jax_train.pid)" '
               '2>/dev/null; then echo "vit_jax training is already running (process group '
               '$(cat vit_jax_train.pid)); run tpu.py stop first." >&2; exit 1; fi; ')
IN_BACKGROUND = " > vit_jax_train.log 2>&1 < /dev/null & echo $! > vit_jax_train.pid"


def test_train_v3_32(cli):
  line, = _dry_run_lines(cli, "train", *SLICE, *TRAIN_ARGS)
  script = (f'cd vit_jax && {TRAINER}; status=$?; '
            'echo "vit_jax.main exited with status $status"; exit "$status"')
  assert shlex.split(line) == [
      "gcloud", "compute", "tpus", "tpu-vm", "ssh", "vit-pod", "--zone=europe-west4-a",
      "--worker=all",
      f"--command={START_GUARD}setsid nohup bash -c '{script}'{IN_BACKGROUND}"]


def test_train_restart_on_preemption(cli):
  line, = _dry_run_lines(cli, "train", *SLICE, *TRAIN_ARGS, "--restart-on-preemption")
  loop = (f'cd vit_jax && while true; do {TRAINER}; status=$?; '
          'echo "vit_jax.main exited with status $status"; '
          'if [ "$status" -ne 75 ]; then exit "$status"; fi; '
          'echo "preempted: restarting from the last checkpoint in 10 s"; sleep 10; done')
  assert shlex.split(line)[-1] == (
      f"--command={START_GUARD}setsid nohup bash -c '{loop}'{IN_BACKGROUND}")
  assert tpu.PREEMPTED_EXIT_CODE == 75


def test_train_single_host_allows_a_local_workdir_and_stays_single_process(cli):
  line, = _dry_run_lines(cli, "train", *SLICE, "--accelerator-type=v3-8", "--config=c.py",
                         "--workdir=/home/me/run")
  assert "python3 -m vit_jax.main --config=c.py --workdir=/home/me/run; status" in line


def test_logs_stop_delete(cli):
  ssh = f"{GCLOUD} ssh vit-pod --zone=europe-west4-a"
  assert _dry_run_lines(cli, "logs", *SLICE) == [
      f"{ssh} --worker=0 '--command=tail -n 100 vit_jax_train.log'"]
  assert _dry_run_lines(cli, "logs", *SLICE, "--worker=3", "--lines=20", "--follow") == [
      f"{ssh} --worker=3 '--command=tail -n 20 -F vit_jax_train.log'"]
  stop, = _dry_run_lines(cli, "stop", *SLICE)
  assert shlex.split(stop)[-2:] == [
      "--worker=all",
      '--command=if [ -e vit_jax_train.pid ]; then kill -TERM -- "-$(cat vit_jax_train.pid)" '
      '2>/dev/null && echo "sent SIGTERM to vit_jax training (process group '
      '$(cat vit_jax_train.pid))"; rm -f vit_jax_train.pid; else echo "no vit_jax_train.pid: '
      'no training started by tpu.py train"; fi']
  assert _dry_run_lines(cli, "delete", *SLICE) == [
      f"{GCLOUD} delete vit-pod --zone=europe-west4-a"]
  assert _dry_run_lines(cli, "delete", *SLICE, "--project=p", "--yes") == [
      f"{GCLOUD} delete vit-pod --zone=europe-west4-a --project=p --quiet"]


def test_hosts_per_slice():
  """Hosts of Google's topology tables: 8 cores per v3/v4/v5p host, 4 chips per v5e/v6e host."""
  expected = {"v3-8": 1, "v3-32": 4, "v3-2048": 256, "v4-8": 1, "v4-16": 2, "v4-32": 4,
              "v5p-8": 1, "v5p-16": 2, "v5litepod-8": 1, "v5litepod-16": 4,
              "v5litepod-256": 64, "v6e-4": 1, "v6e-16": 4}
  assert {t: tpu.num_hosts(t) for t in expected} == expected


# --------------------------------------------------------------------------- errors

def test_unknown_accelerator_type_lists_the_known_ones(cli):
  status, out, err = cli("create", *SLICE, "--accelerator-type=v3-16", "--dry-run")
  assert status == 2 and out == ""
  assert "Unknown accelerator type 'v3-16'; known types: v3-8, v3-32," in err
  assert "v4-32" in err and "v5litepod-16" in err


def test_multi_host_workdir_must_be_on_gcs(cli):
  status, out, err = cli("train", *SLICE, "--accelerator-type=v3-32", "--config=c.py",
                         "--workdir=/home/me/run", "--dry-run")
  assert status == 2 and out == ""
  assert ("--workdir=/home/me/run is not a gs:// path, but a v3-32 slice has 4 hosts and "
          "every host must see the same workdir") in err
  # Without --accelerator-type the slice may be multi-host: gs:// is required too.
  status, _, err = cli("train", *SLICE, "--config=c.py", "--workdir=run", "--dry-run")
  assert status == 2 and "every host must see the same workdir" in err
  assert "pass its --accelerator-type (e.g. v3-8)" in err


def test_bad_arguments(cli):
  status, _, err = cli("train", *SLICE, "--config=c.py", "--workdir=gs://b/r", "--steps=3",
                       "--dry-run")
  assert status == 2 and "Unexpected arguments ['--steps=3']" in err
  assert "--config.FIELD=VALUE" in err
  status, _, err = cli("create", *SLICE, "--accelerator-type=v3-8", "--spot", "--reserved")
  assert status == 2 and "not allowed with argument --spot" in err


# --------------------------------------------------------------------------- running gcloud

@pytest.fixture
def fake_gcloud(tmp_path, monkeypatch):
  """A `gcloud` first on PATH that records its arguments and exits with $FAKE_STATUS."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  calls = tmp_path / "calls.txt"
  script = bin_dir / "gcloud"
  script.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" >> {calls}\necho --- >> {calls}\n'
                    'exit "${FAKE_STATUS:-0}"\n')
  script.chmod(0o755)
  monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
  return calls


def test_runs_the_gcloud_commands(cli, fake_gcloud):
  status, out, err = cli("delete", *SLICE, "--project=p")
  assert status == 0, err
  assert fake_gcloud.read_text().split("\n")[:-1] == [
      "compute", "tpus", "tpu-vm", "delete", "vit-pod", "--zone=europe-west4-a",
      "--project=p", "---"]
  assert f"+ {GCLOUD} delete vit-pod" in err


def test_a_failing_command_is_named_with_its_exit_code(cli, fake_gcloud, monkeypatch):
  monkeypatch.setenv("FAKE_STATUS", "3")
  status, _, err = cli("stop", *SLICE)
  assert status == 3
  assert (f"tpu.py: error: command failed with exit code 3: {GCLOUD} ssh vit-pod "
          "--zone=europe-west4-a --worker=all") in err


def test_missing_gcloud_is_reported(cli, tmp_path, monkeypatch):
  monkeypatch.setenv("PATH", str(tmp_path))  # No gcloud here.
  status, out, err = cli("delete", *SLICE)
  assert status == 2 and out == ""
  assert "gcloud (the Google Cloud CLI) is not installed or not on PATH" in err
  assert "--dry-run" in err


def test_pack_source_leaves_out_what_workers_do_not_need(tmp_path):
  source = tmp_path / "src"
  for name in ["setup.py", "vit_jax/training/workdir.py", "launch/tpu.py", ".git/HEAD",
               "vit_jax/__pycache__/x.pyc", ".venv/bin/python", "vit_jax.egg-info/PKG-INFO",
               "workdir_digits/ckpt", "build/lib/x.py", "tmp/scratch"]:
    (source / name).parent.mkdir(parents=True, exist_ok=True)
    (source / name).write_text(name)
  tpu.pack_source(source, tmp_path / "src.tar.gz")
  with tarfile.open(tmp_path / "src.tar.gz") as tar:
    files = sorted(m.name for m in tar.getmembers() if m.isfile())
  assert files == ["./launch/tpu.py", "./setup.py", "./vit_jax/training/workdir.py"]


# --------------------------------------------------------------------------- remote shell

FAKE_TRAINER = """\
import pathlib, signal, sys, time
runs = pathlib.Path("runs.txt")
n = len(runs.read_text().splitlines()) if runs.exists() else 0
runs.write_text((runs.read_text() if runs.exists() else "") + " ".join(sys.argv[1:]) + "\\n")
if "--config.sleep=1" in sys.argv:
  def preempted(*_):
    print("trainer got SIGTERM", flush=True)
    sys.exit(75)
  signal.signal(signal.SIGTERM, preempted)
  print("trainer started", flush=True)
  time.sleep(60)
sys.exit(75 if n == 0 else 0)
"""


def _remote_command(argv) -> str:
  _, (command,) = tpu.parse(argv)
  flag, = [a for a in command if a.startswith("--command=")]
  return flag[len("--command="):]


def _on_worker(home, command) -> subprocess.CompletedProcess:
  """Runs a remote command as `gcloud ... ssh` would: in the worker's home directory."""
  return subprocess.run(["bash", "-c", command], cwd=home, capture_output=True, text=True,
                        timeout=30, check=False, env={**os.environ, "HOME": str(home)})


def _wait_for(condition, timeout_s=30.0):
  deadline = time.monotonic() + timeout_s
  while not condition():
    assert time.monotonic() < deadline, "timed out"
    time.sleep(0.05)


def _group_alive(pgid: int) -> bool:
  try:
    os.killpg(pgid, 0)
    return True
  except ProcessLookupError:
    return False


@pytest.fixture
def worker_home(tmp_path):
  """A worker's home with a stand-in `vit_jax` package in ~/vit_jax; stops what it left."""
  if shutil.which("setsid") is None:
    pytest.skip("setsid (util-linux) is not installed")
  package = tmp_path / "vit_jax" / "vit_jax"
  package.mkdir(parents=True)
  (package / "__init__.py").write_text("")
  (package / "main.py").write_text(FAKE_TRAINER)
  yield tmp_path
  pid_file = tmp_path / "vit_jax_train.pid"
  if pid_file.exists() and _group_alive(int(pid_file.read_text())):
    os.killpg(int(pid_file.read_text()), signal.SIGKILL)


def _train_argv(*extra):
  return ["train", *SLICE, "--accelerator-type=v3-32", "--config=c.py",
          "--workdir=gs://b/r", f"--python={sys.executable}", "--restart-delay=0", *extra]


def test_restart_loop_reruns_a_preempted_trainer(worker_home):
  started = _on_worker(worker_home, _remote_command(_train_argv("--restart-on-preemption")))
  assert started.returncode == 0, started.stderr
  log = worker_home / "vit_jax_train.log"
  _wait_for(lambda: "exited with status 0" in log.read_text())
  assert log.read_text().splitlines() == [
      "vit_jax.main exited with status 75",
      "preempted: restarting from the last checkpoint in 0 s",
      "vit_jax.main exited with status 0"]
  runs = (worker_home / "vit_jax" / "runs.txt").read_text().splitlines()
  assert runs == ["--config=c.py --workdir=gs://b/r --config.distributed.mode=on"] * 2


def test_without_restart_a_preempted_trainer_stays_stopped(worker_home):
  assert _on_worker(worker_home, _remote_command(_train_argv())).returncode == 0
  log = worker_home / "vit_jax_train.log"
  _wait_for(lambda: "exited with status" in log.read_text())
  assert log.read_text().splitlines() == ["vit_jax.main exited with status 75"]


def test_stop_ends_the_trainer_and_its_restart_loop(worker_home):
  train = _remote_command(_train_argv("--restart-on-preemption", "--config.sleep=1"))
  assert _on_worker(worker_home, train).returncode == 0
  log = worker_home / "vit_jax_train.log"
  _wait_for(lambda: "trainer started" in log.read_text())
  pgid = int((worker_home / "vit_jax_train.pid").read_text())

  again = _on_worker(worker_home, train)
  assert again.returncode == 1 and "already running" in again.stderr

  stopped = _on_worker(worker_home, _remote_command(["stop", *SLICE]))
  assert stopped.stdout == f"sent SIGTERM to vit_jax training (process group {pgid})\n"
  _wait_for(lambda: not _group_alive(pgid))
  assert "trainer got SIGTERM" in log.read_text()
  assert "restarting" not in log.read_text()
  assert len((worker_home / "vit_jax" / "runs.txt").read_text().splitlines()) == 1
  assert not (worker_home / "vit_jax_train.pid").exists()
  assert _on_worker(worker_home, _remote_command(["stop", *SLICE])).stdout == (
      "no vit_jax_train.pid: no training started by tpu.py train\n")


# --------------------------------------------------------------------------- shellcheck

def test_launch_scripts_pass_shellcheck():
  if shutil.which("shellcheck") is None:
    if os.environ.get("CI") == "true":
      pytest.fail("CI=true but shellcheck is not installed: .ci/run installs it "
                  "(apt-get install shellcheck) before the tests.")
    pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
  scripts = sorted(glob.glob(str(ROOT / "launch" / "*.sh")))
  assert len(scripts) >= 3
  result = subprocess.run(["shellcheck", *scripts], capture_output=True, text=True,
                          timeout=60, check=False)
  assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------- SLURM

# srun's variables for task 5 of `sbatch --nodes=2 --ntasks-per-node=4 --gpus-per-node=4`
# (job 123456, nodes gpu01 and gpu02): every task sees the node's four GPUs.
TWO_NODES_FOUR_TASKS = {
    "SLURM_JOB_ID": "123456", "SLURM_NTASKS": "8", "SLURM_NPROCS": "8",
    "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
    "SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_STEP_NODELIST": "gpu[01-02]",
    "SLURM_NTASKS_PER_NODE": "4", "SLURM_TASKS_PER_NODE": "4(x2)",
    "CUDA_VISIBLE_DEVICES": "0,1,2,3",
}
PORT_123456 = 61440 + 576  # 123456 = 30 * 4096 + 576


def test_slurm_two_nodes_four_tasks_one_gpu_each():
  assert slurm.slurm_distributed_kwargs(TWO_NODES_FOUR_TASKS) == dict(
      coordinator_address=f"gpu01:{PORT_123456}", num_processes=8, process_id=5,
      local_device_ids=[1], cluster_detection_method="deactivate")


def test_slurm_kwargs_are_jax_distributed_initialize_arguments():
  jax = pytest.importorskip("jax")
  inspect.signature(jax.distributed.initialize).bind(
      **slurm.slurm_distributed_kwargs(TWO_NODES_FOUR_TASKS))


def test_slurm_gpus_bound_per_task_are_all_used():
  """--gpus-per-task=1: SLURM shows each task only its own GPU."""
  env = {**TWO_NODES_FOUR_TASKS, "SLURM_GPUS_PER_TASK": "1", "CUDA_VISIBLE_DEVICES": "1"}
  assert "local_device_ids" not in slurm.slurm_distributed_kwargs(env)


def test_slurm_blocks_of_gpus_per_task():
  env = {**TWO_NODES_FOUR_TASKS, "SLURM_NTASKS": "4", "SLURM_PROCID": "3",
         "SLURM_NTASKS_PER_NODE": "2", "SLURM_GPUS_PER_TASK": "a100:2"}
  assert slurm.slurm_distributed_kwargs(env)["local_device_ids"] == [2, 3]


def test_slurm_one_task_per_node_drives_all_gpus():
  env = {"SLURM_JOB_ID": "77", "SLURM_NTASKS": "2", "SLURM_PROCID": "1",
         "SLURM_LOCALID": "0", "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "node[07-08]",
         "SLURM_TASKS_PER_NODE": "1(x2)", "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}
  # No local_device_ids, and no auto-detection that would pick [SLURM_LOCALID] = GPU 0.
  assert slurm.slurm_distributed_kwargs(env) == dict(
      coordinator_address=f"node07:{61440 + 77}", num_processes=2, process_id=1,
      cluster_detection_method="deactivate")


def test_slurm_uneven_tasks_per_node():
  env = {"SLURM_JOB_ID": "9", "SLURM_NPROCS": "7", "SLURM_PROCID": "6", "SLURM_LOCALID": "0",
         "SLURM_NODELIST": "a[1-4]", "SLURM_TASKS_PER_NODE": "2(x3),1", "SLURM_NODEID": "3"}
  kwargs = slurm.slurm_distributed_kwargs(env)
  assert kwargs["num_processes"] == 7 and "local_device_ids" not in kwargs  # Alone on a4.
  assert slurm.slurm_distributed_kwargs({**env, "SLURM_NODEID": "0"})["local_device_ids"] == [0]


@pytest.mark.parametrize("env", [
    {},
    {"SLURM_JOB_ID": "5", "SLURM_NTASKS": "1", "SLURM_PROCID": "0",
     "SLURM_JOB_NODELIST": "node01"},
    {"SLURM_NTASKS": "4", "SLURM_PROCID": "0"},  # Not inside a SLURM job.
], ids=["no_slurm", "single_task", "no_job_id"])
def test_slurm_not_a_multi_task_job(env):
  assert slurm.slurm_distributed_kwargs(env) is None


@pytest.mark.parametrize("nodelist, hosts", [
    ("node[01-04,07]", ["node01", "node02", "node03", "node04", "node07"]),
    ("gpu-a[1-2],gpu-b3", ["gpu-a1", "gpu-a2", "gpu-b3"]),
    ("host1,host2", ["host1", "host2"]),
    ("node[8-10]", ["node8", "node9", "node10"]),
    ("n[098-101]", ["n098", "n099", "n100", "n101"]),
    ("rack[1-2]-n[01-02]", ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"]),
    ("c[3],d", ["c3", "d"]),
])
def test_expand_hostlist(nodelist, hosts):
  assert slurm.expand_hostlist(nodelist) == hosts
  env = {"SLURM_JOB_ID": "8", "SLURM_JOB_NODELIST": nodelist}
  assert slurm.coordinator_address(env) == f"{hosts[0]}:61448"


def test_slurm_coordinator_port_and_step_nodelist():
  env = {**TWO_NODES_FOUR_TASKS, "VIT_JAX_COORDINATOR_PORT": "23456",
         "SLURM_STEP_NODELIST": "gpu02"}  # A step on the second node only.
  assert slurm.coordinator_address(env) == "gpu02:23456"


@pytest.mark.parametrize("changes, message", [
    ({"SLURM_PROCID": "8"}, "SLURM_PROCID=8 must be in [0, 8)"),
    ({"SLURM_PROCID": None}, "SLURM_PROCID is not set: start every task with srun"),
    ({"SLURM_NTASKS": "eight"}, "SLURM_NTASKS='eight' is not an integer"),
    ({"SLURM_STEP_NODELIST": "gpu[01-"},
     "SLURM_STEP_NODELIST='gpu[01-' is not a SLURM host list: a '[' is never closed"),
    ({"SLURM_STEP_NODELIST": "gpu[2-1]"}, "range '2-1' runs backwards"),
    ({"SLURM_STEP_NODELIST": "gpu[a-b]"}, "'a-b' is not a number or a range"),
    ({"SLURM_STEP_NODELIST": "gpu01,,gpu02"}, "empty or blank-padded host name"),
    ({"SLURM_STEP_NODELIST": None, "SLURM_JOB_NODELIST": None},
     "None of SLURM_STEP_NODELIST, SLURM_JOB_NODELIST, SLURM_NODELIST is set"),
    ({"VIT_JAX_COORDINATOR_PORT": "70000"}, "VIT_JAX_COORDINATOR_PORT=70000 is not a TCP port"),
    ({"SLURM_LOCALID": None}, "SLURM_LOCALID is not set"),
    ({"CUDA_VISIBLE_DEVICES": "0,1", "SLURM_LOCALID": "3"},
     "SLURM_LOCALID=3 with 1 GPU(s) per task needs GPUs 3-3, but CUDA_VISIBLE_DEVICES lists 2"),
])
def test_slurm_inconsistent_environment(changes, message):
  env = dict(TWO_NODES_FOUR_TASKS)
  for name, value in changes.items():
    if value is None:
      env.pop(name)
    else:
      env[name] = value
  with pytest.raises(ValueError) as error:
    slurm.slurm_distributed_kwargs(env)
  assert message in str(error.value)


def test_slurm_module_prints_the_coordinator():
  env = {**os.environ, "SLURM_JOB_ID": "4100", "SLURM_JOB_NODELIST": "gpu-[07-08]",
         "PYTHONPATH": str(ROOT)}
  result = subprocess.run([sys.executable, "-m", "vit_jax.parallel.slurm"], env=env,
                          capture_output=True, text=True, timeout=60, check=False)
  assert (result.returncode, result.stdout) == (0, f"gpu-07:{61440 + 4}\n")
  env["SLURM_JOB_NODELIST"] = "gpu-[07"
  result = subprocess.run([sys.executable, "-m", "vit_jax.parallel.slurm"], env=env,
                          capture_output=True, text=True, timeout=60, check=False)
  assert result.returncode == 1 and "is not a SLURM host list" in result.stderr


SLURM_TASK = """\
import os
import jax
from vit_jax.parallel import slurm
jax.distributed.initialize(**slurm.slurm_distributed_kwargs(os.environ))
print(jax.process_index(), jax.process_count(), jax.device_count(), flush=True)
jax.distributed.shutdown()
"""


def test_slurm_kwargs_start_two_real_jax_processes():
  """Two tasks of a simulated job on this host join through jax.distributed (CPU)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  job = {"SLURM_JOB_ID": "31", "SLURM_NTASKS": "2", "SLURM_STEP_NODELIST": "localhost",
         "SLURM_NTASKS_PER_NODE": "2", "VIT_JAX_COORDINATOR_PORT": str(port),
         "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT),
         "XLA_FLAGS": " ".join(flags + ["--xla_force_host_platform_device_count=2"])}
  tasks = [subprocess.Popen(
      [sys.executable, "-c", SLURM_TASK], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True, env={**os.environ, **job, "SLURM_PROCID": str(i), "SLURM_LOCALID": str(i)})
      for i in range(2)]
  try:
    outputs = [t.communicate(timeout=120)[0] for t in tasks]
  finally:
    for t in tasks:
      t.kill()
  assert [t.returncode for t in tasks] == [0, 0], outputs
  assert [o.split()[-3:] for o in outputs] == [["0", "2", "4"], ["1", "2", "4"]]
