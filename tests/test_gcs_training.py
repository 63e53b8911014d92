"""The trainer with its workdir and init_from on gs://, against the local GCS emulator.

A short `python -m vit_jax.main --workdir=gs://...` run leaves checkpoints, params, metrics
and TensorBoard events in the bucket; SIGTERM + rerun resumes from the bucket
bit-identically; fine-tuning starts from a gs:// .npz, a gs:// workdir and an `augreg:`
name; two processes share one gs:// workdir; a prepared dataset on a gs:// data_dir trains
like its local copy; an unreachable bucket fails fast, named.
"""

import os
import signal
import struct
import subprocess
import sys
import time

from etils import epath
import numpy as np
import pytest

from gcs_emulator import free_port, gcs, gcs_server  # pylint: disable=unused-import
from trainer_fixtures import REPO, TINY_FLAGS, as_flags, tiny_config
from vit_jax import checkpoints
from vit_jax import storage
from vit_jax.checkpoints import published
from vit_jax.data.errors import DatasetNotPreparedError
from vit_jax.models import params as names
from vit_jax.training import loop
from vit_jax.training import reporting
from vit_jax.training import workdir as workdir_lib

TOTAL_STEPS = 20
RUN_FLAGS = dict(TINY_FLAGS, total_steps=TOTAL_STEPS, log_every=2, eval_every=0,
                 checkpoint_every=10, batch_size=32)
TIMEOUT = 180


def _env(server, devices=8, cache_dir=None):
  env = server.subprocess_env()
  env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu", PYTHONFAULTHANDLER="1",
             PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
  if cache_dir:
    env.update(JAX_COMPILATION_CACHE_DIR=cache_dir,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  return env


def _start(server, workdir, cache_dir, flags=None, extra=()):
  command = [sys.executable, "-m", "vit_jax.main", f"--workdir={workdir}",
             *as_flags(flags or RUN_FLAGS), *extra]
  return subprocess.Popen(command, cwd=REPO, env=_env(server, cache_dir=cache_dir),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc, returncode: int = 0) -> str:
  out, _ = proc.communicate(timeout=TIMEOUT)
  assert proc.returncode == returncode, out[-3000:]
  return out


def _flat(tree) -> dict:
  return {k: np.asarray(v) for k, v in names.flatten(tree).items()}


def _assert_identical(a, b, skip=()):
  flat_a, flat_b = _flat(a), _flat(b)
  assert flat_a.keys() == flat_b.keys()
  for key in flat_a:
    if not key.startswith(tuple(skip)):
      assert flat_a[key].tobytes() == flat_b[key].tobytes(), key


def _scalar_events(data: bytes) -> dict:
  """{tag: [(step, value)]} from a TensorBoard event file (TFRecord framing: u64 length,
  u32 crc, payload, u32 crc; payloads are Event protos)."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  scalars, offset = {}, 0
  while offset < len(data):
    (length,) = struct.unpack_from("<Q", data, offset)
    event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
    offset += 12 + length + 4
    for value in event.summary.value:
      scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
  return scalars


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  """A persistent XLA compilation cache shared by the runs, so only the first compiles."""
  return str(tmp_path_factory.mktemp("xla_cache"))


@pytest.fixture(scope="module")
def reference(gcs_server, cache_dir):
  """An uninterrupted 20-step run in gs://BUCKET/reference: (workdir, its output)."""
  workdir = gcs_server.bucket() + "/reference"
  out = _finish(_start(gcs_server, workdir, cache_dir))
  return workdir, out


def test_a_run_on_gs_leaves_checkpoints_params_metrics_and_events(gcs, reference):
  workdir, out = reference
  assert f"Done: {TOTAL_STEPS} steps" in out and f"checkpoints: {workdir}/checkpoints" in out
  root = epath.Path(workdir)
  assert sorted(p.name for p in (root / "checkpoints").iterdir()) == ["10", "20"]
  assert workdir_lib.read_config(workdir).total_steps == TOTAL_STEPS
  records = reporting.read_metrics(workdir)
  train = [r for r in records if r["kind"] == "train"]
  assert [r["step"] for r in train] == list(range(2, TOTAL_STEPS + 1, 2))
  assert [r["step"] for r in records if r["kind"] == "eval"] == [TOTAL_STEPS]
  # One event file (process 0's), holding the same numbers as metrics.jsonl (float32).
  (events,) = list((root / "tensorboard").iterdir())
  assert events.name.startswith("events.out.tfevents.")
  scalars = _scalar_events(events.read_bytes())
  assert scalars["train/loss"] == [(r["step"], np.float32(r["loss"])) for r in train]
  assert [s for s, _ in scalars["eval/accuracy"]] == [TOTAL_STEPS]
  # The exported params are the last checkpoint's, read back from the bucket by Orbax.
  _assert_identical(checkpoints.restore_params(f"{workdir}/params"),
                    checkpoints.restore_params(f"{workdir}/checkpoints/20"))


def test_sigterm_then_rerun_resumes_from_the_bucket_bit_identically(
    gcs, gcs_server, reference, cache_dir):
  workdir = gcs_server.bucket() + "/interrupted"
  proc = _start(gcs_server, workdir, cache_dir)
  seen = []
  for line in proc.stdout:
    seen.append(line)
    if line.startswith("step  4/"):
      break
  proc.send_signal(signal.SIGTERM)
  out = "".join(seen) + _finish(proc, returncode=loop.PREEMPTED_EXIT_CODE)
  assert "Preemption (SIGTERM): saving a checkpoint at step" in out, out[-2000:]
  stopped = int(out.split("saving a checkpoint at step ")[1].split(" ")[0])
  assert 4 <= stopped < TOTAL_STEPS
  assert not epath.Path(workdir, "params").exists()

  out = _finish(_start(gcs_server, workdir, cache_dir))
  assert f"Resumed from the checkpoint at step {stopped} in {workdir}/checkpoints" in out
  assert f"Done: {TOTAL_STEPS} steps" in out
  _assert_identical(checkpoints.restore_params(f"{workdir}/params"),
                    checkpoints.restore_params(f"{reference[0]}/params"))
  # metrics.jsonl was rewritten without the steps the preempted run logged twice.
  train_steps = [r["step"] for r in reporting.read_metrics(workdir) if r["kind"] == "train"]
  assert train_steps == list(range(2, TOTAL_STEPS + 1, 2))
  # Two runs, two event files; the rerun's starts where the checkpoint was.
  assert len(list(epath.Path(workdir, "tensorboard").iterdir())) == 2


def _write_augreg_bucket(gcs, params) -> str:
  """A pretrained_root with augreg/index.csv; the best i21k run of Ti_4 holds `params`,
  the others hold shifted copies (a wrong choice shows in the numbers)."""
  root = gcs.bucket()
  runs = [  # (filename, ds, final_val, shift)
      ("Ti_4-i21k-300ep-lr_0.001-aug_light0-wd_0.1-do_0.0-sd_0.0", "i21k", 0.41, 1.0),
      ("Ti_4-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0", "i21k", 0.47, 0.0),
      ("Ti_4-i1k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0", "i1k", 0.78, 2.0),
      ("S_4-i21k-300ep-lr_0.001-aug_light1-wd_0.1-do_0.0-sd_0.0", "i21k", 0.52, 3.0),
  ]
  lines = ["name,ds,final_val,adapt_ds,adapt_resolution,filename,adapt_filename"]
  for filename, ds, final_val, shift in runs:
    name = filename.split("-")[0].replace("_", "/")
    lines.append(f"{name},{ds},{final_val},cifar100,384,{filename},"
                 f"{filename}--cifar100-steps_10k-lr_0.003-res_384")
    shifted = {k: v + shift for k, v in _flat(params).items()}
    checkpoints.save_npz(f"{root}/augreg/{filename}.npz", names.unflatten(shifted))
  epath.Path(root, "augreg", "index.csv").write_text("\n".join(lines) + "\n")
  return root


def test_init_from_a_gs_npz_and_a_gs_workdir_reads_their_params(gcs, reference):
  workdir = reference[0]
  params = checkpoints.restore_params(f"{workdir}/params")
  npz = gcs.bucket() + "/weights/x.npz"
  checkpoints.save_npz(npz, params)
  assert workdir_lib.resolve_init_from(npz) == npz
  assert workdir_lib.resolve_init_from(workdir) == f"{workdir}/params"
  _assert_identical(checkpoints.read_params(npz), params)
  _assert_identical(checkpoints.read_params(f"{workdir}/params"), params)


def test_fine_tuning_starts_from_an_augreg_name(gcs, reference, tmp_path):
  """The whole chain, name -> index.csv -> best file -> trained run: one step at the
  warm-up's lr 0 exports exactly the loaded parameters, with a fresh zero head."""
  params = checkpoints.restore_params(f"{reference[0]}/params")
  root = _write_augreg_bucket(gcs, params)
  config = tiny_config(init_from="augreg:Ti_4", pretrained_root=root, total_steps=1,
                       warmup_steps=1, eval_every=0, checkpoint_every=1, batch_size=32,
                       num_classes=12)
  summary = loop.train_and_evaluate(config, str(tmp_path / "run"))
  tuned = checkpoints.restore_params(summary["params_dir"])
  _assert_identical(tuned, params, skip=["head"])
  assert tuned["head"]["kernel"].shape == (32, 12) and not tuned["head"]["kernel"].any()


def test_published_names_resolve_to_bucket_files_and_unknown_ones_list_known(gcs):
  root = gcs.bucket()
  for folder, model in (("imagenet21k", "ViT-B_16"), ("imagenet21k+imagenet2012", "ViT-L_16")):
    epath.Path(root, folder, f"{model}.npz").write_bytes(b"PK")
  assert published.resolve("i21k:ViT-B_16", root) == f"{root}/imagenet21k/ViT-B_16.npz"
  assert published.resolve("i21k+i1k:ViT-L_16", root) == (
      f"{root}/imagenet21k+imagenet2012/ViT-L_16.npz")
  with pytest.raises(published.UnknownPublishedName,
                     match=r"'i21k:ViT-X_9'.*Known i21k names: ViT-B_16\."):
    published.resolve("i21k:ViT-X_9", root)
  with pytest.raises(published.UnknownPublishedName,
                     match=r"known schemes: i21k \(imagenet21k/\), i21k\+i1k .*augreg"):
    published.resolve("jft:ViT-B_16", root)
  root = _write_augreg_bucket(gcs, {"w": np.zeros(2, np.float32)})
  with pytest.raises(published.UnknownPublishedName, match=r"Known models: S_4, Ti_4 "):
    published.resolve("augreg:B_16", root)
  full = "Ti_4-i1k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0"
  assert published.resolve(f"augreg:{full}", root) == f"{root}/augreg/{full}.npz"
  assert not published.is_name("gs://b/x.npz") and not published.is_name("runs/a:b/c")


def test_two_processes_share_one_gs_workdir(gcs, gcs_server, cache_dir):
  workdir = gcs_server.bucket() + "/pair"
  port = free_port()
  flags = dict(TINY_FLAGS, total_steps=10, log_every=5, eval_every=0, checkpoint_every=5,
               batch_size=32, eval_batch_size=64)
  procs = []
  for pid in range(2):
    dist = {"distributed.coordinator_address": f"127.0.0.1:{port}",
            "distributed.num_processes": 2, "distributed.process_id": pid}
    command = [sys.executable, "-m", "vit_jax.main", f"--workdir={workdir}",
               *as_flags(flags), *as_flags(dist)]
    procs.append(subprocess.Popen(command, cwd=REPO, env=_env(gcs_server, devices=2),
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True))
  out0, out1 = [_finish(p) for p in procs]
  assert "Done: 10 steps" in out0 and "2 process(es)" in out0
  assert "step " not in out1  # Process 1 prints and writes nothing of its own.
  root = epath.Path(workdir)
  assert sorted(p.name for p in (root / "checkpoints").iterdir()) == ["10", "5"]
  assert [r["step"] for r in reporting.read_metrics(workdir) if r["kind"] == "train"] == [5, 10]
  assert len(list((root / "tensorboard").iterdir())) == 1
  _assert_identical(checkpoints.restore_params(f"{workdir}/params"),
                    checkpoints.restore_params(f"{workdir}/checkpoints/10"))


def test_an_unreachable_bucket_fails_fast_naming_the_path(gcs, gcs_server, tmp_path,
                                                          monkeypatch):
  missing = "gs://no-such-bucket-vit-jax/run"
  started = time.monotonic()
  result = subprocess.run(
      [sys.executable, "-m", "vit_jax.main", f"--workdir={missing}", *as_flags(RUN_FLAGS)],
      cwd=REPO, env=_env(gcs_server), capture_output=True, text=True, timeout=TIMEOUT)
  assert result.returncode == 1, result.stderr[-2000:]
  assert (f"Error: workdir {missing}: bucket gs://no-such-bucket-vit-jax does not exist"
          in result.stderr)
  assert "Traceback" not in result.stderr and time.monotonic() - started < 60
  # init_from on a missing bucket, and an endpoint where nothing listens: named at once.
  with pytest.raises(storage.StorageError,
                     match=r"config.init_from gs://no-such-bucket-vit-jax/x.npz: bucket"):
    loop.train_and_evaluate(tiny_config(init_from="gs://no-such-bucket-vit-jax/x.npz"),
                            str(tmp_path / "a"))
  monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{free_port()}")
  started = time.monotonic()
  with pytest.raises(storage.StorageError, match=r"workdir gs://any-bucket/run: cannot "
                     "connect to the GCS endpoint"):
    loop.train_and_evaluate(tiny_config(), "gs://any-bucket/run")
  assert time.monotonic() - started < 5
  assert not (tmp_path / "a").exists()


def test_training_reads_a_prepared_dataset_from_a_gs_data_dir(gcs, tmp_path):
  """tfds metadata through epath, ArrayRecord records through array_record's own GCS
  client: the same data, so the same parameters as reading the local copy."""
  local = tmp_path / "tfds"
  run = dict(total_steps=6, log_every=3, eval_every=0, checkpoint_every=6, warmup_steps=2,
             batch_size=32)
  on_disk = loop.train_and_evaluate(tiny_config(data_dir=str(local), **run),
                                    str(tmp_path / "local"))
  data_dir = gcs.bucket() + "/tfds"
  with pytest.raises(DatasetNotPreparedError,
                     match=r"(?s)prepared on first use on local disk only.*"
                     rf"gcloud storage cp -r ~/tensorflow_datasets/digits {data_dir}/"):
    loop.train_and_evaluate(tiny_config(data_dir=data_dir, **run), str(tmp_path / "none"))
  for f in (local / "digits" / "1.0.0").iterdir():
    epath.Path(data_dir, "digits", "1.0.0", f.name).write_bytes(f.read_bytes())
  on_gs = loop.train_and_evaluate(tiny_config(data_dir=data_dir, **run),
                                  str(tmp_path / "remote"))
  assert on_gs["accuracy"] == on_disk["accuracy"]
  _assert_identical(checkpoints.restore_params(on_gs["params_dir"]),
                    checkpoints.restore_params(on_disk["params_dir"]))
