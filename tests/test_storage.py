"""vit_jax.storage paths and gs:// I/O (epath, Orbax, grain) on a local emulator."""

import io
import os
import socket
import subprocess
import sys
import textwrap
import time

from etils import epath
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
import orbax.checkpoint as ocp
import pytest

from gcs_emulator import free_port, gcs, gcs_server  # pylint: disable=unused-import
from vit_jax import storage
from vit_jax.storage import StorageError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bits(x) -> bytes:
  return np.asarray(x).tobytes()


def _sharded_tree():
  """A small train-state-like pytree; 'w' split over the 8 devices."""
  mesh = jax.make_mesh((8,), ('data',))
  rows = NamedSharding(mesh, P('data'))
  w = np.arange(16 * 4, dtype=np.float32).reshape(16, 4) / 7
  w[0, :3] = [np.nan, -0.0, np.inf]  # bit patterns a lossy path would change
  return {
      'params': {'w': jax.device_put(w, rows),
                 'b': jnp.asarray([1.5, -2.25, 3.0], jnp.bfloat16)},
      'step': jnp.asarray(7, jnp.int32),
  }


def _abstract(tree):
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
      tree)


def _assert_bit_identical(restored, expected):
  assert jax.tree.structure(restored) == jax.tree.structure(expected)
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(expected)):
    assert got.dtype == want.dtype and got.shape == want.shape
    assert got.sharding == want.sharding
    assert _bits(got) == _bits(want)


# ---- path helpers (no emulator) ----

def test_as_path_makes_local_paths_absolute_and_leaves_urls_alone(
    tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv('HOME', '/home/someone')
  assert os.fspath(storage.as_path('runs/a')) == f'{tmp_path}/runs/a'
  assert os.fspath(storage.as_path('~/runs')) == '/home/someone/runs'
  assert os.fspath(storage.as_path('gs://bkt/runs/a')) == 'gs://bkt/runs/a'
  assert os.fspath(storage.as_path(epath.Path('gs://bkt/x'))) == 'gs://bkt/x'
  assert storage.is_remote('gs://bkt/x') and storage.is_remote('s3://b/x')
  assert not storage.is_remote('/tmp/x') and not storage.is_remote('gs:/x')
  with pytest.raises(StorageError, match=r"'http://h/x'.*unsupported"):
    storage.as_path('http://h/x')


def test_invalid_bucket_name_is_refused_without_network():
  with pytest.raises(StorageError, match=r'workdir gs://B_/runs.*bucket name'):
    storage.check_reachable('gs://B_/runs', 'workdir')


def test_check_dataset_dir_refuses_schemes_array_record_cannot_read(tmp_path):
  assert storage.check_dataset_dir(tmp_path) == epath.Path(tmp_path)
  with pytest.raises(StorageError, match=r's3://b/tfds.*gcsfuse --implicit-dirs'):
    storage.check_dataset_dir('s3://b/tfds')


# ---- gs:// on the emulator ----

def test_epath_write_read_list_exists(gcs):
  root = epath.Path(gcs.bucket())
  (root / 'run/config.json').write_text('{"lr": 0.1}')
  (root / 'run/sub/blob.bin').write_bytes(b'\x00\x01\xff')
  assert (root / 'run/config.json').read_text() == '{"lr": 0.1}'
  assert (root / 'run/sub/blob.bin').read_bytes() == b'\x00\x01\xff'
  assert sorted(p.name for p in (root / 'run').iterdir()) == [
      'config.json', 'sub']
  assert (root / 'run/sub').is_dir() and (root / 'run/config.json').exists()
  assert not (root / 'run/missing.txt').exists()
  (root / 'run/config.json').unlink()
  assert not (root / 'run/config.json').exists()


def test_npz_written_by_epath_reads_back(gcs):
  path = epath.Path(gcs.bucket()) / 'eval/logits.npz'
  logits = np.random.default_rng(0).normal(size=(5, 10)).astype(np.float32)
  labels = np.arange(5, dtype=np.int64)
  with path.open('wb') as f:
    np.savez(f, logits=logits, labels=labels)
  with np.load(io.BytesIO(path.read_bytes())) as loaded:
    assert _bits(loaded['logits']) == _bits(logits)
    assert _bits(loaded['labels']) == _bits(labels)


def test_checkpoint_manager_sharded_save_restore(gcs):
  tree = _sharded_tree()
  directory = epath.Path(gcs.bucket()) / 'workdir/checkpoints'
  options = ocp.CheckpointManagerOptions(max_to_keep=1)
  with ocp.CheckpointManager(directory, options=options) as manager:
    manager.save(1, args=ocp.args.StandardSave(tree))
    manager.save(2, args=ocp.args.StandardSave(tree))
    manager.wait_until_finished()
    assert manager.all_steps() == [2]  # step 1 deleted from the bucket
  assert [p.name for p in directory.iterdir()] == ['2']
  with ocp.CheckpointManager(directory) as manager:
    assert manager.latest_step() == 2
    restored = manager.restore(2, args=ocp.args.StandardRestore(
        _abstract(tree)))
  _assert_bit_identical(restored, tree)


def test_standard_checkpointer_save_restore(gcs):
  tree = _sharded_tree()
  path = epath.Path(gcs.bucket()) / 'export/params'
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(path, tree)
    checkpointer.wait_until_finished()
    restored = checkpointer.restore(path, _abstract(tree))
  _assert_bit_identical(restored, tree)


def test_check_reachable_accepts_a_new_dir_in_an_existing_bucket(gcs):
  url = gcs.bucket() + '/runs/new'
  assert os.fspath(storage.check_reachable(url, 'workdir')) == url


def test_check_reachable_names_a_missing_bucket(gcs):
  start = time.monotonic()
  with pytest.raises(StorageError, match=(
      r'workdir gs://no-such-bucket-0/runs: bucket gs://no-such-bucket-0 '
      r'does not exist')):
    storage.check_reachable('gs://no-such-bucket-0/runs', 'workdir')
  assert time.monotonic() - start < 2


def test_check_reachable_fails_fast_when_nothing_listens(gcs, monkeypatch):
  closed = f'http://127.0.0.1:{free_port()}'
  monkeypatch.setenv('STORAGE_EMULATOR_HOST', closed)
  monkeypatch.setenv('TENSORSTORE_GCS_HTTP_URL', closed)
  start = time.monotonic()
  with pytest.raises(StorageError) as error:
    storage.check_reachable(gcs.bucket() + '/ckpt', 'checkpoint dir')
  assert time.monotonic() - start < 2
  assert 'checkpoint dir gs://vit-test-' in str(error.value)
  assert f'cannot connect to the GCS endpoint {closed}' in str(error.value)


@pytest.mark.parametrize('variable, client', [
    ('STORAGE_EMULATOR_HOST', 'gcsfs'), ('TENSORSTORE_GCS_HTTP_URL', 'tensorstore')])
def test_check_reachable_gives_up_on_a_silent_endpoint(gcs, monkeypatch,
                                                       variable, client):
  bucket = gcs.bucket()
  with socket.socket() as silent:  # accepts connections, never answers
    silent.bind(('127.0.0.1', 0))
    silent.listen(16)
    url = f'http://127.0.0.1:{silent.getsockname()[1]}'
    monkeypatch.setenv(variable, url)
    start = time.monotonic()
    with pytest.raises(StorageError, match=rf'workdir {bucket}: no answer from '
                       rf'{url} \({client}'):
      storage.check_reachable(bucket, 'workdir', timeout_s=1.5)
    assert time.monotonic() - start < 3


def test_subprocess_with_fixture_env_writes_via_epath_and_orbax(gcs):
  bucket = gcs.bucket()
  child = textwrap.dedent(f"""
      import time
      import numpy as np, orbax.checkpoint as ocp
      from etils import epath
      from vit_jax import storage
      start = time.monotonic()
      storage.check_reachable('{bucket}/child', 'workdir')
      assert time.monotonic() - start < 2, time.monotonic() - start
      epath.Path('{bucket}/child/hello.txt').write_text('from child')
      with ocp.StandardCheckpointer() as c:
        c.save('{bucket}/child/ckpt', {{'x': np.arange(6, dtype=np.int32)}})
  """)
  env = gcs.subprocess_env()
  env.pop('XLA_FLAGS', None)  # one CPU device is enough for the child
  env['PYTHONPATH'] = os.pathsep.join([REPO, env.get('PYTHONPATH', '')])
  subprocess.run([sys.executable, '-c', child], env=env, check=True,
                 timeout=120)
  assert epath.Path(f'{bucket}/child/hello.txt').read_text() == 'from child'
  with ocp.StandardCheckpointer() as c:
    restored = c.restore(f'{bucket}/child/ckpt')
  assert _bits(restored['x']) == _bits(np.arange(6, dtype=np.int32))


@pytest.mark.timeout(60)
def test_grain_reads_array_record_from_gs(gcs, tmp_path):
  grain = pytest.importorskip('grain')
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  records = [f'record {i}'.encode() * (i + 1) for i in range(7)]
  local = tmp_path / 'train.array_record-00000-of-00001'
  writer = array_record_module.ArrayRecordWriter(os.fspath(local),
                                                 'group_size:1')
  for record in records:
    writer.write(record)
  writer.close()
  data_dir = epath.Path(gcs.bucket()) / 'tfds'
  epath.Path(local).copy(data_dir / local.name)
  assert storage.check_dataset_dir(data_dir) == data_dir
  source = grain.sources.ArrayRecordDataSource([os.fspath(data_dir / local.name)])
  assert len(source) == 7
  assert [source[i] for i in (6, 0, 3)] == [records[6], records[0], records[3]]


def test_check_dataset_dir_wants_the_cpp_reader_on_the_emulator(gcs, monkeypatch):
  monkeypatch.delenv('CLOUD_STORAGE_EMULATOR_ENDPOINT')
  with pytest.raises(StorageError,
                     match='only follows CLOUD_STORAGE_EMULATOR_ENDPOINT'):
    storage.check_dataset_dir(gcs.bucket() + '/tfds')
