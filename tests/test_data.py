"""Tests of vit_jax.data: sources, preprocessing, sharding, resumption, errors."""

import collections
import json
import os

import jax
import numpy as np
import pytest

import data_fixtures as fx
from vit_jax import data
from vit_jax.data import images as images_lib
from vit_jax.data import preparation as prepare_lib
from vit_jax import prepare as prepare_cmd


@pytest.fixture(scope='session')
def digits_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds_digits'))


@pytest.fixture(scope='session')
def tiny_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp('tfds_tiny')
  fx.prepare_tiny(d)
  return str(d)


@pytest.fixture(scope='session')
def folder(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('images') / 'shapes')
  fx.write_image_folder(root)
  return root


def tiny_config(tiny_dir, **kw):
  return fx.small_config(dataset='vit_test_tiny', data_dir=tiny_dir, **kw)


def ids(batch):
  """Example ids of the tiny dataset: each image is constant = its index."""
  img = batch['image']
  assert (img == img[:, :1, :1, :1]).all(), 'tiny images must stay constant'
  return img[:, 0, 0, 0].astype(int)


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_same_batches(xs, ys):
  assert len(xs) == len(ys)
  for x, y in zip(xs, ys):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


# ---------------------------------------------------------------- images

def test_normalize_images_numpy_and_jax():
  x = np.array([0, 127, 255], np.uint8)
  np.testing.assert_allclose(data.normalize_images(x), [-1.0, 127 / 127.5 - 1, 1.0], atol=1e-6)
  y = data.normalize_images(jax.numpy.asarray(x))
  assert isinstance(y, jax.Array) and y.dtype == np.float32
  np.testing.assert_allclose(np.asarray(y), [-1.0, -0.003921569, 1.0], atol=1e-6)


def test_decode_grayscale_rgba_and_webp(folder):
  gray = open(os.path.join(folder, 'train/gray/a.png'), 'rb').read()
  img = data.decode_image(gray)
  assert img.shape == (20, 30, 3) and img.dtype == np.uint8
  assert (img == fx.GRAY).all()
  rgba = data.decode_image(open(os.path.join(folder, 'train/blue/a.png'), 'rb').read())
  assert rgba.shape == (30, 40, 3)
  np.testing.assert_array_equal(rgba[0, 0], fx.BLUE)
  webp = data.decode_image(open(os.path.join(folder, 'train/red/b.webp'), 'rb').read())
  assert webp.shape == (50, 20, 3)
  np.testing.assert_array_equal(webp[3, 3], fx.RED)


def test_crop_window_area_and_aspect():
  rng = np.random.default_rng(0)
  areas, aspects = [], []
  for _ in range(2000):
    y, x, h, w = images_lib.sample_crop_window(rng, 300, 400)
    assert 0 <= y and y + h <= 300 and 0 <= x and x + w <= 400
    areas.append(h * w / (300 * 400))
    aspects.append(w / h)
  areas, aspects = np.array(areas), np.array(aspects)
  assert areas.min() >= 0.04 and areas.max() <= 1.0
  assert 0.3 < np.median(areas) < 0.7   # ~uniform in [0.05, 1]
  inner = aspects[areas < 0.5]          # those never hit the fallback
  assert inner.min() > 0.74 and inner.max() < 1.35


def test_train_and_eval_transform_shapes():
  img = np.arange(60 * 80 * 3, dtype=np.uint8).reshape(60, 80, 3)
  out = data.train_transform(img, np.random.default_rng(1), 32)
  assert out.shape == (32, 32, 3) and out.dtype == np.uint8
  assert data.eval_transform(img, 24).shape == (24, 24, 3)
  crop = data.eval_transform(img, 24, 'resize_crop')
  assert crop.shape == (24, 24, 3)
  with pytest.raises(ValueError, match='eval_mode'):
    data.eval_transform(img, 24, 'bogus')


# ---------------------------------------------------------------- digits

def test_digits_info_and_batches(digits_dir):
  cfg = fx.small_config(data_dir=digits_dir, batch_size=16, eval_batch_size=64)
  info = data.get_info(cfg)
  assert info.name == 'digits' and info.num_classes == 10
  assert info.class_names == tuple(str(i) for i in range(10))
  assert info.num_examples == {'train': 1437, 'test': 360}
  it = data.make_train_iterator(cfg, seed=0, process_index=0, process_count=1)
  b = next(it)
  it.close()
  assert b['image'].shape == (16, 16, 16, 3) and b['image'].dtype == np.uint8
  assert b['label'].shape == (16,) and b['label'].dtype == np.int32
  assert 0 <= b['label'].min() and b['label'].max() <= 9
  assert b['image'].max() > 200 and b['image'].min() == 0     # 0..255 scans
  # grayscale -> RGB: the three channels are equal
  np.testing.assert_array_equal(b['image'][..., 0], b['image'][..., 2])
  # eval: stratified split, every class present; 360 = 5 full batches + 40
  assert data.num_eval_batches(cfg, process_count=1) == 6
  labels = np.concatenate([e['label'][e['mask']] for e in
                           data.make_eval_iterator(cfg, process_index=0, process_count=1)])
  assert len(labels) == 360
  np.testing.assert_array_equal(np.bincount(labels), [36, 36, 35, 37, 36, 37, 36, 36, 35, 36])


def test_digits_eval_matches_sklearn(digits_dir):
  from vit_jax.data import digits as digits_lib
  cfg = fx.small_config(data_dir=digits_dir, eval_batch_size=360, pp={'crop': 8})
  batch = next(iter(data.make_eval_iterator(cfg, process_index=0, process_count=1)))
  imgs, labels = digits_lib.digits_splits()['test']
  assert batch['mask'].all()
  # crop 8 = native size: the decoded PNGs are exactly the scaled scans
  got = {(int(l), im[..., 0].tobytes()) for l, im in zip(batch['label'], batch['image'])}
  want = {(int(l), im.tobytes()) for l, im in zip(labels, imgs)}
  assert got == want


def test_digits_prepare_is_idempotent(digits_dir):
  path = prepare_lib.prepare('digits', digits_dir)
  assert path.endswith(os.path.join('digits', '1.0.0'))
  assert sorted(f for f in os.listdir(path) if 'array_record' in f) == [
      'digits-test.array_record-00000-of-00001', 'digits-train.array_record-00000-of-00001']


# ---------------------------------------------------------------- tfds builder

def test_tfds_info_and_split_slices(tiny_dir):
  cfg = tiny_config(tiny_dir, train_split='train[:75%]', eval_split='test[5:]')
  info = data.get_info(cfg)
  assert info.name == 'vit_test_tiny' and info.class_names == ('a', 'b', 'c')
  assert info.num_examples == {'train[:75%]': 28, 'test[5:]': 18}


def test_eval_every_example_once_two_processes(tiny_dir):
  cfg = tiny_config(tiny_dir, eval_batch_size=8)     # 23 test examples, 4 per process
  assert data.num_eval_batches(cfg, process_count=2) == 3
  seen = []
  for p in range(2):
    batches = list(data.make_eval_iterator(cfg, process_index=p, process_count=2))
    assert len(batches) == 3
    for b in batches:
      assert b['image'].shape == (4, 16, 16, 3) and b['mask'].dtype == np.bool_
      # padding is masked and zero
      assert (b['image'][~b['mask']] == 0).all()
      seen.extend(ids(b)[b['mask']])
      np.testing.assert_array_equal(b['label'][b['mask']], ids(b)[b['mask']] % 3)
  assert sorted(seen) == list(range(23))
  # one process sees all of it, last batch padded
  batches = list(data.make_eval_iterator(cfg, process_index=0, process_count=1))
  assert [int(b['mask'].sum()) for b in batches] == [8, 8, 7]


def test_train_shards_disjoint_and_cover_split(tiny_dir):
  cfg = tiny_config(tiny_dir, batch_size=6)          # 37 examples: 18 per process
  per_process = []
  for p in range(2):
    it = data.make_train_iterator(cfg, seed=3, process_index=p, process_count=2)
    batches = take(it, 12)                           # two epochs of 6 batches x 3
    it.close()
    for b in batches:
      assert b['image'].shape == (3, 16, 16, 3)
      np.testing.assert_array_equal(b['label'], ids(b) % 3)
    epoch0 = np.concatenate([ids(b) for b in batches[:6]])
    epoch1 = np.concatenate([ids(b) for b in batches[6:]])
    assert len(set(epoch0)) == 18 and len(set(epoch1)) == 18
    assert list(epoch0) != list(epoch1)              # reshuffled each epoch
    per_process.append((set(epoch0), set(epoch1)))
  for e in range(2):
    a, b = per_process[0][e], per_process[1][e]
    assert not a & b
    assert len(a | b) == 36 and (a | b) <= set(range(37))


def test_train_epoch_covers_split_one_process(tiny_dir):
  cfg = tiny_config(tiny_dir, batch_size=37)
  it = data.make_train_iterator(cfg, seed=0, process_index=0, process_count=1)
  b = next(it)
  it.close()
  assert sorted(ids(b)) == list(range(37))


def test_same_seed_same_batches_different_seed_differs(tiny_dir, digits_dir):
  for cfg in (tiny_config(tiny_dir), fx.small_config(data_dir=digits_dir)):
    runs = {}
    for seed in (0, 0, 1):
      it = data.make_train_iterator(cfg, seed=seed, process_index=0, process_count=1)
      runs.setdefault(seed, []).append(take(it, 3))
      it.close()
    assert_same_batches(runs[0][0], runs[0][1])
    assert not all(np.array_equal(x['image'], y['image'])
                   for x, y in zip(runs[0][0], runs[1][0]))


def test_resume_from_json_state_gives_same_batches(digits_dir):
  cfg = fx.small_config(data_dir=digits_dir, batch_size=64)
  it = data.make_train_iterator(cfg, seed=7, process_index=0, process_count=1)
  take(it, 20)                                       # crosses the epoch (22 batches)
  state = json.loads(json.dumps(it.get_state()))
  expected = take(it, 5)
  it.close()
  resumed = data.make_train_iterator(cfg, seed=7, process_index=0, process_count=1)
  resumed.set_state(state)
  assert_same_batches(take(resumed, 5), expected)
  resumed.set_state(json.dumps(state).encode())      # bytes are accepted too
  assert_same_batches(take(resumed, 5), expected)
  resumed.close()
  other = data.make_train_iterator(cfg, seed=8, process_index=0, process_count=1)
  with pytest.raises(ValueError, match='seed'):
    other.set_state(state)
  other.close()


def test_eval_iterator_state_round_trip(tiny_dir):
  cfg = tiny_config(tiny_dir, eval_batch_size=4)
  it = data.make_eval_iterator(cfg, process_index=0, process_count=1)
  next(it)
  state = json.loads(json.dumps(it.get_state()))
  rest = list(it)
  it2 = data.make_eval_iterator(cfg, process_index=0, process_count=1)
  it2.set_state(state)
  assert_same_batches(list(it2), rest)
  assert len(rest) == 5


# ---------------------------------------------------------------- image folder

def test_image_folder_mixed_formats(folder):
  cfg = fx.small_config(dataset=folder, batch_size=7, eval_batch_size=7)
  info = data.get_info(cfg)
  assert info.class_names == ('blue', 'gray', 'red')
  assert info.num_examples == {'train': 7, 'test': 7}
  expected = {0: fx.BLUE, 1: (fx.GRAY,) * 3, 2: fx.RED}
  ev = next(iter(data.make_eval_iterator(cfg, process_index=0, process_count=1)))
  assert ev['mask'].all() and sorted(ev['label']) == [0, 0, 1, 1, 2, 2, 2]
  tr = next(data.make_train_iterator(cfg, seed=0, process_index=0, process_count=1))
  for b in (ev, tr):
    assert b['image'].shape == (7, 16, 16, 3) and b['image'].dtype == np.uint8
    for img, label in zip(b['image'], b['label']):
      # constant-colour images survive decode, crop and resize (jpeg: +-6)
      np.testing.assert_allclose(img.reshape(-1, 3).mean(0), expected[label], atol=6)


def test_prepared_folder_is_used(folder, tmp_path):
  cfg = fx.small_config(dataset=folder, data_dir=str(tmp_path), eval_batch_size=7)
  direct = next(iter(data.make_eval_iterator(cfg, process_index=0, process_count=1)))
  assert prepare_cmd.main([folder, '--data_dir', str(tmp_path)]) == 0
  info = data.get_info(cfg)
  assert info.name == 'shapes' and info.class_names == ('blue', 'gray', 'red')
  prepared = next(iter(data.make_eval_iterator(cfg, process_index=0, process_count=1)))
  # same examples (ArrayRecord stores them in another order)
  key = lambda b: sorted((int(l), i.tobytes()) for l, i in zip(b['label'], b['image']))
  assert key(direct) == key(prepared)


# ---------------------------------------------------------------- devices

def test_to_global_on_8_device_mesh():
  assert jax.device_count() == 8
  mesh = jax.make_mesh((8,), ('data',))
  batch = {'image': np.arange(16 * 2 * 2 * 3, dtype=np.uint8).reshape(16, 2, 2, 3),
           'label': np.arange(16, dtype=np.int32), 'mask': np.arange(16) % 2 == 0}
  out = data.to_global(batch, mesh)
  for k, v in out.items():
    assert isinstance(v, jax.Array) and v.shape == batch[k].shape
    assert v.sharding.spec == jax.sharding.PartitionSpec(('data',))
    assert len(v.addressable_shards) == 8
    np.testing.assert_array_equal(np.asarray(v), batch[k])
  shard = out['label'].addressable_shards[3]
  np.testing.assert_array_equal(np.asarray(shard.data), [6, 7])
  # 2-D mesh: batch split over 'data' only, replicated over 'model'
  mesh2 = jax.make_mesh((4, 2), ('data', 'model'))
  lab = data.to_global(batch, mesh2)['label']
  assert lab.sharding.shard_shape(lab.shape) == (4,)


def test_prefetch_to_mesh_and_exact_resume(digits_dir):
  mesh = jax.make_mesh((8,), ('data',))
  cfg = fx.small_config(data_dir=digits_dir, batch_size=16)
  it = data.make_train_iterator(cfg, seed=1, process_index=0, process_count=1)
  pf = data.prefetch_to_mesh(it, mesh, size=2)
  take(pf, 3)
  state = json.loads(json.dumps(pf.get_state()))     # state of the *next* batch
  expected = [jax.device_get(b) for b in take(pf, 3)]
  pf.close()
  it2 = data.make_train_iterator(cfg, seed=1, process_index=0, process_count=1)
  it2.set_state(state)
  got = take(it2, 3)
  it2.close()
  assert_same_batches(got, expected)
  assert expected[0]['image'].shape == (16, 16, 16, 3)


def test_worker_processes_match_in_process(digits_dir):
  base = fx.small_config(data_dir=digits_dir, batch_size=16)
  it = data.make_train_iterator(base, seed=2, process_index=0, process_count=1)
  want = take(it, 3)
  it.close()
  cfg = fx.small_config(data_dir=digits_dir, batch_size=16, data_workers=1)
  it = data.make_train_iterator(cfg, seed=2, process_index=0, process_count=1)
  try:
    assert_same_batches(take(it, 3), want)
  finally:
    it.close()


# ---------------------------------------------------------------- errors

def test_unknown_dataset_name(tmp_path):
  with pytest.raises(ValueError, match=r"Unknown dataset 'no_such_dataset'.*digits"):
    data.get_info(fx.small_config(dataset='no_such_dataset', data_dir=str(tmp_path)))


def test_unprepared_dataset_prints_command(tmp_path):
  cfg = fx.small_config(dataset='vit_test_tiny', data_dir=str(tmp_path))
  with pytest.raises(FileNotFoundError) as e:
    data.make_train_iterator(cfg, seed=0, process_index=0, process_count=1)
  assert f'python -m vit_jax.prepare vit_test_tiny --data_dir {tmp_path}' in str(e.value)
  assert isinstance(e.value, data.DatasetNotPreparedError)


def test_missing_and_empty_folders(tmp_path):
  with pytest.raises(ValueError, match='does not exist'):
    data.get_info(fx.small_config(dataset=str(tmp_path / 'missing')))
  empty = tmp_path / 'empty'
  empty.mkdir()
  with pytest.raises(ValueError, match='is empty'):
    data.get_info(fx.small_config(dataset=str(empty)))
  (empty / 'train' / 'cat').mkdir(parents=True)
  (empty / 'train' / 'cat' / 'x.jpg').write_bytes(b'')
  (empty / 'train' / 'dog').mkdir()
  (empty / 'train' / 'dog' / 'readme.txt').write_text('no images here')
  with pytest.raises(ValueError, match=r"Class folder '.*dog' contains no images"):
    data.get_info(fx.small_config(dataset=str(empty)))


def test_missing_split_in_folder(folder):
  cfg = fx.small_config(dataset=folder, eval_split='validation')
  with pytest.raises(ValueError, match="Split 'validation' not found"):
    data.make_eval_iterator(cfg, process_index=0, process_count=1)


def test_batch_size_not_divisible(tiny_dir):
  with pytest.raises(ValueError, match='multiple of the number of processes'):
    data.make_train_iterator(tiny_config(tiny_dir, batch_size=6), seed=0,
                             process_index=0, process_count=4)


def _corrupt_folder(tmp_path):
  root = tmp_path / 'bad'
  fx.write_image_folder(str(root))
  bad = root / 'train' / 'red' / 'broken.jpg'
  bad.write_bytes(b'\xff\xd8\xff\xe0 this is not really a jpeg')
  (root / 'test' / 'red' / 'broken.png').write_bytes(b'garbage')
  return root, bad


def test_corrupt_image_names_path(tmp_path):
  root, bad = _corrupt_folder(tmp_path)
  cfg = fx.small_config(dataset=str(root), batch_size=8)
  it = data.make_train_iterator(cfg, seed=0, process_index=0, process_count=1)
  with pytest.raises(ValueError, match='Cannot decode image .*broken.jpg.*skip_corrupt') as e:
    next(it)
  it.close()
  assert isinstance(e.value, data.CorruptImageError) and e.value.path == str(bad)


def test_skip_corrupt_counts_and_masks(tmp_path):
  root, _ = _corrupt_folder(tmp_path)
  cfg = fx.small_config(dataset=str(root), batch_size=8, eval_batch_size=8,
                        data_threads=0, pp={'skip_corrupt': True})  # no read-ahead
  it = data.make_train_iterator(cfg, seed=0, process_index=0, process_count=1)
  b = next(it)                                       # 8 examples incl. the broken one
  assert b['image'].shape == (8, 16, 16, 3) and it.num_corrupt_skipped == 1
  assert collections.Counter(b['label'].tolist())[2] == 4   # 'red' replaced by a neighbour
  it.close()
  ev = data.make_eval_iterator(cfg, process_index=0, process_count=1)
  batches = list(ev)
  assert ev.num_corrupt_skipped == 1
  assert sum(int(x['mask'].sum()) for x in batches) == 7    # 8 files, 1 masked out


def test_prepare_cli_reports_errors(tmp_path, capsys):
  assert prepare_cmd.main(['no_such_dataset_xyz', '--data_dir', str(tmp_path)]) == 2
  assert "Unknown tfds dataset 'no_such_dataset_xyz'" in capsys.readouterr().err


def test_prepare_overwrite_picks_up_new_images(tmp_path):
  root = tmp_path / 'pics'
  fx.write_image_folder(str(root))
  cfg = fx.small_config(dataset=str(root), data_dir=str(tmp_path / 'tfds'))
  prepare_lib.prepare(str(root), str(tmp_path / 'tfds'))
  assert data.get_info(cfg).num_examples['train'] == 7
  fx.Image.fromarray(fx._rgb(fx.RED)).save(str(root / 'train' / 'red' / 'new.png'))
  prepare_lib.prepare(str(root), str(tmp_path / 'tfds'))          # reused as is
  assert data.get_info(cfg).num_examples['train'] == 7
  prepare_lib.prepare(str(root), str(tmp_path / 'tfds'), overwrite=True)
  assert data.get_info(cfg).num_examples['train'] == 8


def test_digits_preparation_race_is_safe(tmp_path):
  import subprocess
  import sys
  code = ('import sys; from vit_jax.data.digits import digits_builder; '
          'b = digits_builder(sys.argv[1]); '
          'print(b.info.splits["train"].num_examples, b.info.splits["test"].num_examples)')
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(data.__file__))))
  env = dict(os.environ, PYTHONPATH=repo)
  procs = [subprocess.Popen([sys.executable, '-c', code, str(tmp_path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for _ in range(2)]
  outs = [p.communicate(timeout=120) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-2000:]
    assert out.split()[-2:] == ['1437', '360']
  assert os.listdir(tmp_path / 'digits') == ['1.0.0']    # no leftover temp dirs


def test_folder_spec_vs_tfds_name(tmp_path, monkeypatch):
  from vit_jax.data import sources
  monkeypatch.chdir(tmp_path)
  (tmp_path / 'cifar10').mkdir()
  (tmp_path / 'my_pics').mkdir()
  assert not sources.is_folder_spec('cifar10')       # the tfds name wins
  assert sources.is_folder_spec('./cifar10')
  assert sources.is_folder_spec('my_pics')
  assert not sources.is_folder_spec('vit_test_tiny')


def test_prepare_numpy_image_dataset_without_tensorflow(tmp_path):
  path = prepare_lib.prepare('vit_test_numpy', str(tmp_path))
  assert os.path.isdir(path)
  cfg = fx.small_config(dataset='vit_test_numpy', data_dir=str(tmp_path),
                        eval_batch_size=4, pp={'crop': 5})
  assert data.get_info(cfg).num_examples == {'train': 10, 'test': 4}
  b = next(iter(data.make_eval_iterator(cfg, process_index=0, process_count=1)))
  order = np.argsort(b['image'][:, 0, 0, 0])
  np.testing.assert_array_equal(b['image'][order][:, 2, 2], [[0, 100, 250], [10, 100, 249],
                                                             [20, 100, 248], [30, 100, 247]])
  np.testing.assert_array_equal(b['label'][order], [0, 1, 0, 1])


def test_eval_resize_crop_mode_and_batch_size_fallback(folder):
  cfg = fx.small_config(dataset=folder, batch_size=4, pp={'eval_mode': 'resize_crop', 'crop': 12})
  cfg.eval_batch_size = None  # None: the training batch size.
  batches = list(data.make_eval_iterator(cfg, process_index=1, process_count=2))
  assert data.num_eval_batches(cfg, process_count=2) == 2 == len(batches)
  assert batches[0]['image'].shape == (2, 12, 12, 3)
  assert [b['mask'].tolist() for b in batches] == [[True, True], [True, False]]
