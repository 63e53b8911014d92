#!/usr/bin/env python3
"""Cloud TPU VMs for vit_jax: create a slice, install, train, read the log, stop, delete.

  python launch/tpu.py create --name=vit --zone=europe-west4-a --accelerator-type=v3-32 --spot
  python launch/tpu.py setup  --name=vit --zone=europe-west4-a
  python launch/tpu.py train  --name=vit --zone=europe-west4-a --accelerator-type=v3-32 \\
      --config=configs/vit_b16.py:imagenet2012 --workdir=gs://BUCKET/runs/b16 \\
      [--restart-on-preemption] [--config.FIELD=VALUE ...]
  python launch/tpu.py logs   --name=vit --zone=europe-west4-a [--worker=1] [--follow]
  python launch/tpu.py stop   --name=vit --zone=europe-west4-a
  python launch/tpu.py delete --name=vit --zone=europe-west4-a

Each subcommand is a list of `gcloud compute tpus tpu-vm ...` commands, built as argument
lists; --dry-run prints them (shell-quoted) instead of running them. Commands on the VM
run on every worker (--worker=all): a multi-host slice runs one trainer per host, and
they find each other through jax.distributed (config.distributed.mode=on).

Only the Python standard library is used, so this runs on any machine with gcloud.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
from typing import Callable, Sequence, Union

# The trainer's exit status after a preemption (SIGTERM: it saved a checkpoint and
# stopped early): EX_TEMPFAIL of sysexits.h, "try again later". It equals
# vit_jax.training.loop.PREEMPTED_EXIT_CODE (tests/test_robustness.py checks): this script
# runs without vit_jax installed, so it cannot import it.
PREEMPTED_EXIT_CODE = 75

SOURCE_ROOT = pathlib.Path(__file__).resolve().parents[1]
REMOTE_DIR = "vit_jax"  # On each worker, relative to the home directory.
LOG_FILE = "vit_jax_train.log"  # In the home directory of each worker.
PID_FILE = "vit_jax_train.pid"  # The trainer's process group, for `stop`.
REMOTE_ARCHIVE = "vit_jax_src.tar.gz"
RESTART_DELAY_S = 10  # Default pause between a preempted run and its restart.


@dataclasses.dataclass(frozen=True)
class Generation:
  """A TPU generation: accelerator types '<prefix>-<size>' and their hosts.

  `size` counts TensorCores for v3/v4/v5p (8 per host) and chips for v5e/v6e (up to 8 on
  one host, 4 per host in larger slices).
  """
  prefix: str
  sizes: tuple[int, ...]
  runtime_version: str  # The TPU VM image for JAX (gcloud --version).
  units_per_host: int
  single_host_max: int = 8

  def hosts(self, size: int) -> int:
    return 1 if size <= self.single_host_max else size // self.units_per_host


GENERATIONS = (
    Generation("v3", (8, 32, 64, 128, 256, 512, 1024, 2048), "tpu-ubuntu2204-base", 8),
    Generation("v4", (8, 16, 32, 64, 128, 256, 512, 1024, 1536, 2048, 4096),
               "tpu-ubuntu2204-base", 8),
    Generation("v5litepod", (1, 4, 8, 16, 32, 64, 128, 256), "v2-alpha-tpuv5-lite", 4),  # v5e
    Generation("v5p", (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 12288),
               "v2-alpha-tpuv5", 8),
    Generation("v6e", (1, 4, 8, 16, 32, 64, 128, 256), "v2-alpha-tpuv6e", 4),
)
ACCELERATOR_TYPES = {f"{g.prefix}-{size}": (g, size) for g in GENERATIONS for size in g.sizes}


class LaunchError(ValueError):
  """A bad flag or a failed command; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class LocalStep:
  """A step run here, in Python, between gcloud commands (packing the source)."""
  description: str
  run: Callable[[], None]


Step = Union[Sequence[str], LocalStep]


# --------------------------------------------------------------------------- validation

def accelerator(accelerator_type: str) -> tuple[Generation, int]:
  """(generation, size) of e.g. 'v3-32'; LaunchError listing the known types otherwise."""
  if accelerator_type not in ACCELERATOR_TYPES:
    raise LaunchError(f"Unknown accelerator type {accelerator_type!r}; known types: "
                      f"{', '.join(ACCELERATOR_TYPES)}.")
  return ACCELERATOR_TYPES[accelerator_type]


def num_hosts(accelerator_type: str) -> int:
  generation, size = accelerator(accelerator_type)
  return generation.hosts(size)


def check_workdir(workdir: str, accelerator_type: str | None) -> None:
  """A multi-host slice (or one of unknown size) needs a gs:// workdir."""
  if workdir.startswith("gs://"):
    return
  if accelerator_type is None:
    raise LaunchError(
        f"--workdir={workdir} is not a gs:// path. On a multi-host slice every host must "
        "see the same workdir (they write each checkpoint together and all read it back on "
        "a restart), so use a Cloud Storage bucket, e.g. --workdir=gs://BUCKET/runs/NAME. "
        "For a single-host TPU VM pass its --accelerator-type (e.g. v3-8) to allow a local "
        "directory.")
  hosts = num_hosts(accelerator_type)
  if hosts > 1:
    raise LaunchError(
        f"--workdir={workdir} is not a gs:// path, but a {accelerator_type} slice has "
        f"{hosts} hosts and every host must see the same workdir (they write each "
        "checkpoint together and all read it back on a restart): use a Cloud Storage "
        "bucket, e.g. --workdir=gs://BUCKET/runs/NAME.")


def _check_remote_dir(remote_dir: str) -> None:
  if not re.fullmatch(r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*", remote_dir) or \
      ".." in remote_dir.split("/"):
    raise LaunchError(f"--remote-dir={remote_dir!r} must be a plain path relative to the "
                      "workers' home directory, e.g. vit_jax or src/vit_jax.")


# --------------------------------------------------------------------------- commands

def _gcloud(verb: str, args, *positional: str) -> list[str]:
  """gcloud compute tpus tpu-vm VERB POSITIONAL... --zone=... [--project=...]."""
  command = ["gcloud", "compute", "tpus", "tpu-vm", verb, *positional, f"--zone={args.zone}"]
  if args.project:
    command.append(f"--project={args.project}")
  return command


def _ssh(args, remote_command: str, worker: str = "all") -> list[str]:
  return _gcloud("ssh", args, args.name) + [f"--worker={worker}", f"--command={remote_command}"]


def create_commands(args) -> list[Step]:
  generation, _ = accelerator(args.accelerator_type)
  command = _gcloud("create", args, args.name) + [
      f"--accelerator-type={args.accelerator_type}",
      f"--version={args.version or generation.runtime_version}"]
  if args.spot:
    command.append("--spot")
  if args.reserved:
    command.append("--reserved")
  return [command]


def setup_commands(args) -> list[Step]:
  """Puts the source in ~/REMOTE_DIR on every worker and pip-installs it with jax[tpu]."""
  _check_remote_dir(args.remote_dir)
  remote_dir = shlex.quote(args.remote_dir)
  install = f'cd {remote_dir} && {shlex.quote(args.python)} -m pip install -q -U "jax[tpu]" -e .'
  if args.repo:
    repo, ref = shlex.quote(args.repo), shlex.quote(args.ref)
    return [_ssh(args, f"{{ [ -d {remote_dir}/.git ] || {{ rm -rf {remote_dir} && "
                       f"git clone -q {repo} {remote_dir}; }}; }} && "
                       f"git -C {remote_dir} fetch -q {repo} {ref} && "
                       f"git -C {remote_dir} checkout -q --force FETCH_HEAD && {install}")]
  source, archive = pathlib.Path(args.source), pathlib.Path(args.archive)
  if not (source / "setup.py").is_file():
    raise LaunchError(f"--source={source} is not a vit_jax checkout (no setup.py there).")
  return [
      LocalStep(f"pack {source} into {archive} (without .git, virtualenvs, caches, workdirs)",
                lambda: pack_source(source, archive)),
      _gcloud("scp", args, str(archive), f"{args.name}:{REMOTE_ARCHIVE}") + ["--worker=all"],
      _ssh(args, f"rm -rf {remote_dir} && mkdir -p {remote_dir} && "
                 f"tar -xzf {REMOTE_ARCHIVE} -C {remote_dir} && rm {REMOTE_ARCHIVE} && "
                 f"{install}"),
  ]


def train_command_line(args, overrides: Sequence[str]) -> list[str]:
  """The trainer's command line on each worker."""
  command = [args.python, "-m", "vit_jax.main", f"--config={args.config}",
             f"--workdir={args.workdir}"]
  if args.accelerator_type is None or num_hosts(args.accelerator_type) > 1:
    # Every host calls jax.distributed.initialize(), which finds the slice's hosts from
    # the TPU metadata. (A single-host VM stays single-process.)
    command.append("--config.distributed.mode=on")
  return command + list(overrides)


def train_commands(args, overrides: Sequence[str]) -> list[Step]:
  """Starts the trainer in the background on every worker; the ssh session can end."""
  _check_remote_dir(args.remote_dir)
  if args.accelerator_type is not None:
    accelerator(args.accelerator_type)
  check_workdir(args.workdir, args.accelerator_type)
  trainer = shlex.join(train_command_line(args, overrides))
  if args.restart_on_preemption:
    script = (f"cd {shlex.quote(args.remote_dir)} && while true; do {trainer}; status=$?; "
              f"echo \"vit_jax.main exited with status $status\"; "
              f"if [ \"$status\" -ne {PREEMPTED_EXIT_CODE} ]; then exit \"$status\"; fi; "
              f"echo \"preempted: restarting from the last checkpoint in "
              f"{args.restart_delay} s\"; sleep {args.restart_delay}; done")
  else:
    script = (f"cd {shlex.quote(args.remote_dir)} && {trainer}; status=$?; "
              f"echo \"vit_jax.main exited with status $status\"; exit \"$status\"")
  # setsid: the trainer (and the restart loop) get a process group of their own, whose
  # id goes to PID_FILE so `stop` can signal all of it; nohup and the redirections let
  # it outlive the ssh session.
  remote = (f"if [ -e {PID_FILE} ] && kill -0 -- \"-$(cat {PID_FILE})\" 2>/dev/null; then "
            f"echo \"vit_jax training is already running (process group $(cat {PID_FILE})); "
            f"run tpu.py stop first.\" >&2; exit 1; fi; "
            f"setsid nohup bash -c {shlex.quote(script)} > {LOG_FILE} 2>&1 < /dev/null & "
            f"echo $! > {PID_FILE}")
  return [_ssh(args, remote)]


def logs_commands(args) -> list[Step]:
  follow = " -F" if args.follow else ""
  return [_ssh(args, f"tail -n {args.lines}{follow} {LOG_FILE}", worker=args.worker)]


def stop_commands(args) -> list[Step]:
  """SIGTERM (or SIGKILL) to the trainer's process group on every worker.

  On SIGTERM the trainer saves a checkpoint and exits with PREEMPTED_EXIT_CODE; the
  restart loop is in the same process group and ends with it, so nothing restarts.
  """
  signal = "KILL" if args.kill else "TERM"
  return [_ssh(args, (
      f"if [ -e {PID_FILE} ]; then kill -{signal} -- \"-$(cat {PID_FILE})\" 2>/dev/null && "
      f"echo \"sent SIG{signal} to vit_jax training (process group $(cat {PID_FILE}))\"; "
      f"rm -f {PID_FILE}; else echo \"no {PID_FILE}: no training started by tpu.py train\"; "
      "fi"))]


def delete_commands(args) -> list[Step]:
  command = _gcloud("delete", args, args.name)
  if args.yes:
    command.append("--quiet")  # gcloud's flag for: do not ask for confirmation.
  return [command]


def pack_source(source: pathlib.Path, archive: pathlib.Path) -> None:
  """Writes `source` (a checkout) to the .tar.gz `archive`, without what a worker can't use."""
  anywhere = re.compile(r"\.git|__pycache__|\.pytest_cache|\.venv.*|.*\.egg-info")
  top_level = re.compile(r"build|dist|tmp|workdir.*")

  def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
    parts = pathlib.PurePosixPath(info.name).parts  # './a/b' -> ('a', 'b')
    if any(anywhere.fullmatch(p) for p in parts) or \
        (parts and info.isdir() and top_level.fullmatch(parts[0]) and len(parts) == 1):
      return None
    return info

  with tarfile.open(archive, "w:gz") as tar:
    tar.add(source, arcname=".", filter=keep)


# --------------------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument("--name", required=True, help="the TPU VM (slice) name")
  common.add_argument("--zone", required=True, help="e.g. europe-west4-a, us-central2-b")
  common.add_argument("--project", help="Google Cloud project (default: gcloud's)")
  common.add_argument("--dry-run", action="store_true",
                      help="print the gcloud commands instead of running them")

  parser = argparse.ArgumentParser(
      prog="tpu.py", description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

  def add(name, help_text):
    return sub.add_parser(name, parents=[common], help=help_text, description=help_text,
                          allow_abbrev=False)

  create = add("create", "create a TPU VM slice")
  create.add_argument("--accelerator-type", required=True,
                      help=f"e.g. v3-8, v3-32, v4-32, v5litepod-16 (known: "
                           f"{', '.join(ACCELERATOR_TYPES)})")
  create.add_argument("--version", help="TPU VM runtime version (default: per generation, "
                      + ", ".join(f"{g.prefix}: {g.runtime_version}" for g in GENERATIONS)
                      + ")")
  capacity = create.add_mutually_exclusive_group()
  capacity.add_argument("--spot", action="store_true",
                        help="spot capacity: cheaper, can be preempted at any time")
  capacity.add_argument("--reserved", action="store_true",
                        help="use the project's reservation")

  setup = add("setup", "install vit_jax (and jax[tpu]) on every worker")
  setup.add_argument("--repo", help="git URL to clone on the workers (default: copy this "
                     "checkout)")
  setup.add_argument("--ref", default="HEAD", help="branch, tag or commit of --repo")
  setup.add_argument("--source", default=str(SOURCE_ROOT), help="checkout to copy")
  setup.add_argument("--archive", default=os.path.join(tempfile.gettempdir(), REMOTE_ARCHIVE),
                     help="where to pack --source here before copying it")
  setup.add_argument("--remote-dir", default=REMOTE_DIR, help="install directory on the "
                     "workers, relative to home")
  setup.add_argument("--python", default="python3", help="Python on the workers")

  train = add("train", "start training on every worker (in the background); trailing "
              "--config.FIELD=VALUE flags are passed to the trainer")
  train.add_argument("--config", required=True, help="e.g. configs/vit_b16.py:imagenet2012")
  train.add_argument("--workdir", required=True,
                     help="gs://... (required on multi-host slices)")
  train.add_argument("--accelerator-type", help="the slice's type; lets a single-host VM "
                     "use a local workdir")
  train.add_argument("--restart-on-preemption", action="store_true",
                     help=f"rerun the trainer while it exits with {PREEMPTED_EXIT_CODE} "
                          "(preempted; it resumes from the last checkpoint)")
  train.add_argument("--restart-delay", type=int, default=RESTART_DELAY_S,
                     help="seconds to wait before such a restart")
  train.add_argument("--remote-dir", default=REMOTE_DIR)
  train.add_argument("--python", default="python3", help="Python on the workers")

  logs = add("logs", f"print the end of ~/{LOG_FILE} on a worker")
  logs.add_argument("--worker", default="0", help="worker index, or 'all'")
  logs.add_argument("--lines", type=int, default=100)
  logs.add_argument("--follow", action="store_true", help="keep printing new lines")

  stop = add("stop", "stop training on every worker (SIGTERM: it checkpoints first)")
  stop.add_argument("--kill", action="store_true", help="SIGKILL instead: no checkpoint")

  delete = add("delete", "delete the TPU VM")
  delete.add_argument("--yes", action="store_true", help="do not ask for confirmation")
  return parser


_BUILDERS = {"create": create_commands, "setup": setup_commands, "logs": logs_commands,
             "stop": stop_commands, "delete": delete_commands}


def parse(argv: Sequence[str]) -> tuple[argparse.Namespace, list[Step]]:
  """The parsed flags and the steps they ask for; LaunchError for bad flags."""
  args, extra = build_parser().parse_known_args(list(argv))
  if args.command == "train":
    unknown = [a for a in extra if not a.startswith("--config.")]
    if unknown:
      raise LaunchError(f"Unexpected arguments {unknown}; trainer overrides look like "
                        "--config.FIELD=VALUE.")
    return args, train_commands(args, extra)
  if extra:
    raise LaunchError(f"Unexpected arguments for {args.command}: {extra}.")
  return args, _BUILDERS[args.command](args)


def describe(step: Step) -> str:
  return f"# {step.description}" if isinstance(step, LocalStep) else shlex.join(step)


def run_steps(steps: Sequence[Step]) -> int:
  """Runs the steps in order; stops at the first failure and returns its exit status."""
  if any(not isinstance(s, LocalStep) for s in steps) and shutil.which("gcloud") is None:
    raise LaunchError(
        "gcloud (the Google Cloud CLI) is not installed or not on PATH: install it "
        "(https://cloud.google.com/sdk/docs/install), run `gcloud auth login`, or pass "
        "--dry-run to print the commands.")
  for step in steps:
    print(f"+ {describe(step)}", file=sys.stderr, flush=True)
    if isinstance(step, LocalStep):
      try:
        step.run()
      except OSError as e:
        raise LaunchError(f"{step.description} failed: {e}") from None
      continue
    status = subprocess.run(list(step), check=False).returncode
    if status != 0:
      print(f"tpu.py: error: command failed with exit code {status}: {shlex.join(step)}",
            file=sys.stderr, flush=True)
      return status
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  """Runs (or with --dry-run prints) a subcommand's steps; returns the exit status."""
  argv = sys.argv[1:] if argv is None else argv
  try:
    args, steps = parse(argv)
    if args.dry_run:
      for step in steps:
        print(describe(step))
      return 0
    return run_steps(steps)
  except LaunchError as e:
    print(f"tpu.py: error: {e}", file=sys.stderr, flush=True)
    return 2
  except SystemExit as e:  # From argparse: --help, or a usage error it printed.
    return e.code if isinstance(e.code, int) else 2

if __name__ == "__main__":
  sys.exit(main())
