"""One way to name every path the trainer touches: local disk or gs://.

Workdirs and checkpoints may live on Google Cloud Storage. Two clients talk to
it, with their own settings and credentials:
  * etils.epath -> fsspec -> gcsfs (when TensorFlow is absent): directories,
    small files, Orbax's metadata. Endpoint override: STORAGE_EMULATOR_HOST.
  * tensorstore, under Orbax, for the array data. Endpoint override:
    TENSORSTORE_GCS_HTTP_URL.
Both retry a failing request for a long time by default (gcsfs: 6 tries with
back-off, about 30 s; tensorstore: 32 tries with back-off up to 32 s each, i.e.
minutes), and gcsfs first spends ~15 s looking for credentials off Google
Cloud. `check_reachable` asks both once, within a few seconds, before a run
starts, so a wrong bucket or endpoint fails at once with the path named.
"""

import asyncio
import os
import re
import socket
import threading
import time
import urllib.parse

from etils import epath

# Schemes etils.epath can open; anything else with '://' is refused by name.
REMOTE_SCHEMES = ('gs', 's3', 'az', 'hf')
_SCHEME = re.compile(r'^([a-zA-Z][a-zA-Z0-9+.-]*)://')
# GCS bucket names: 3-63 of [a-z0-9-_.], starting and ending alphanumeric.
_BUCKET = re.compile(r'^[a-z0-9][a-z0-9._-]{1,61}[a-z0-9]$')
_GCS_DEFAULT_ENDPOINT = 'https://storage.googleapis.com'
_PROBE_TIMEOUT_S = 8.0

_GCSFUSE_HINT = (
    'mount the bucket with gcsfuse (`gcsfuse --implicit-dirs BUCKET '
    '/mnt/BUCKET`, then pass /mnt/BUCKET/...) or copy the data to local disk '
    '(`gcloud storage cp -r gs://BUCKET/DIR /local/dir`)')
_CREDENTIALS_HINT = (
    'on a TPU/GCE VM its service account needs storage read/write access '
    '(roles/storage.objectUser); elsewhere run '
    '`gcloud auth application-default login` or set '
    'GOOGLE_APPLICATION_CREDENTIALS to a service-account key file')


class StorageError(OSError):
  """A path cannot be used: unreachable, missing bucket, bad name, no access."""


def _scheme(path) -> str | None:
  match = _SCHEME.match(os.fspath(path))
  return match.group(1).lower() if match else None


def is_remote(path) -> bool:
  """True for a URL such as gs://bucket/dir, False for a local path."""
  return _scheme(path) is not None


def as_path(path) -> epath.Path:
  """The epath.Path for `path`: local paths made absolute, URLs untouched.

  Args:
    path: a str, os.PathLike or epath.Path; '~' is expanded for local paths.

  Returns:
    epath.Path; for gs:// etc. exactly the given URL (never os.path.abspath,
    which would turn 'gs://b/x' into '/cwd/gs:/b/x').

  Raises:
    StorageError: for a URL scheme epath cannot open (e.g. 'http://').
  """
  text = os.fspath(path)
  scheme = _scheme(text)
  if scheme is None:
    return epath.Path(os.path.abspath(os.path.expanduser(text)))
  if scheme not in REMOTE_SCHEMES:
    raise StorageError(
        f'{text!r}: unsupported scheme {scheme}://; use a local path or one of '
        + ', '.join(f'{s}://' for s in REMOTE_SCHEMES))
  return epath.Path(text)


def split_gcs(path) -> tuple[str, str]:
  """('bucket', 'dir/sub/') for 'gs://bucket/dir/sub' (prefix '' at the top)."""
  text = os.fspath(path)
  if _scheme(text) != 'gs':
    raise StorageError(f'{text!r} is not a gs:// path')
  bucket, _, prefix = text[len('gs://'):].partition('/')
  prefix = prefix.strip('/')
  return bucket, (prefix + '/' if prefix else '')


def gcsfs_endpoint() -> str:
  """Where gcsfs (epath) sends requests: the emulator or Google's endpoint."""
  host = os.environ.get('STORAGE_EMULATOR_HOST', '')
  if host in ('', 'default'):
    return _GCS_DEFAULT_ENDPOINT
  return host if '://' in host else 'http://' + host


def tensorstore_endpoint() -> str:
  """Where tensorstore (Orbax's array data) sends GCS requests."""
  return os.environ.get('TENSORSTORE_GCS_HTTP_URL') or _GCS_DEFAULT_ENDPOINT


def _check_connects(endpoint: str, where: str, timeout_s: float):
  """A TCP connect to the endpoint, so 'nothing listens' fails in ms."""
  url = urllib.parse.urlsplit(endpoint)
  port = url.port or (443 if url.scheme == 'https' else 80)
  try:
    socket.create_connection((url.hostname, port), timeout=timeout_s).close()
  except OSError as e:
    raise StorageError(
        f'{where}: cannot connect to the GCS endpoint {endpoint} ({e}). '
        + _endpoint_hint()) from e


def _endpoint_hint() -> str:
  if 'STORAGE_EMULATOR_HOST' in os.environ or (
      'TENSORSTORE_GCS_HTTP_URL' in os.environ):
    return ('STORAGE_EMULATOR_HOST / TENSORSTORE_GCS_HTTP_URL point at a '
            'local GCS emulator: is it running on that port?')
  return 'Check the network (and any proxy) to storage.googleapis.com.'


def _gcsfs_list_one(bucket: str, prefix: str, timeout_s: float):
  """Lists at most one object under the prefix with epath's gcsfs client.

  Runs in a daemon thread: building the client may look for credentials
  (metadata server pings) for ~15 s, which no timeout of gcsfs bounds.
  """
  import fsspec.asyn  # pylint: disable=g-import-not-at-top
  fs = epath.backend.fsspec_backend.fs(f'gs://{bucket}')

  async def list_one():
    # wait_for cancels gcsfs's own retry loop instead of leaving it running.
    return await asyncio.wait_for(
        fs._call('GET', 'b/{}/o', bucket, prefix=prefix, maxResults=1,  # pylint: disable=protected-access
                 json_out=True),
        timeout_s)

  return fsspec.asyn.sync(fs.loop, list_one)


def _run_in_thread(fn, timeout_s: float):
  """fn() in a daemon thread: (result, exception), or TimeoutError."""
  outcome = {}

  def target():
    try:
      outcome['result'] = fn()
    except BaseException as e:  # pylint: disable=broad-except
      outcome['error'] = e

  thread = threading.Thread(target=target, daemon=True, name='gcs-probe')
  thread.start()
  thread.join(timeout_s)
  if thread.is_alive():
    raise TimeoutError
  if 'error' in outcome:
    raise outcome['error']
  return outcome.get('result')


def _explain(e: BaseException, where: str, bucket: str, client: str) -> str:
  text = str(e)
  # gcsfs: FileNotFoundError (HTTP 404); tensorstore: NOT_FOUND from GCS, and
  # from the local emulator a 404 without a JSON body it cannot parse.
  if isinstance(e, FileNotFoundError) or 'NOT_FOUND' in text or (
      'Failed to parse response metadata' in text):
    return (f'{where}: bucket gs://{bucket} does not exist or is not visible '
            f'to these credentials ({client}: {text})')
  code = getattr(e, 'code', None)
  if code == 401 or 'UNAUTHENTICATED' in text or 'Anonymous caller' in text:
    return f'{where}: no valid GCS credentials ({client}: {text}); ' + (
        _CREDENTIALS_HINT)
  if code == 403 or 'Forbidden' in text or 'PERMISSION_DENIED' in text:
    return (f'{where}: permission denied on gs://{bucket} ({client}: {text}); '
            + _CREDENTIALS_HINT)
  return f'{where}: GCS request failed ({client}: {type(e).__name__}: {text})'


def _probe_tensorstore(bucket: str, prefix: str, where: str, deadline: float):
  """Reads one (absent) key with tensorstore, retrying at most twice."""
  import tensorstore as ts  # pylint: disable=g-import-not-at-top
  context = ts.Context({'gcs_request_retries': {
      'max_retries': 2, 'initial_delay': '0.2s', 'max_delay': '1s'}})
  try:
    store = ts.KvStore.open({'driver': 'gcs', 'bucket': bucket},
                            context=context).result(
                                timeout=max(0.1, deadline - time.monotonic()))
    store.read(prefix + '.vit_jax_probe').result(
        timeout=max(0.1, deadline - time.monotonic()))
  except TimeoutError as e:
    raise StorageError(
        f'{where}: no answer from {tensorstore_endpoint()} (tensorstore, used '
        'by Orbax for array data) within the time allowed. ' + _endpoint_hint()
    ) from e
  except Exception as e:  # pylint: disable=broad-except
    raise StorageError(_explain(e, where, bucket, 'tensorstore')) from e


def check_reachable(path, what: str, *, timeout_s: float = _PROBE_TIMEOUT_S
                    ) -> epath.Path:
  """Fails within ~timeout_s if a gs:// location cannot be used; else its path.

  For gs:// it checks the bucket name, connects to both clients' endpoints,
  lists one object under the path with gcsfs (epath) and reads one absent key
  with tensorstore (Orbax). It does not write. Local paths and other schemes
  are returned unchecked.

  Args:
    path: str or path, e.g. 'gs://my-bucket/runs/vit_b16'.
    what: what the path is for, named in the error ('workdir', 'init_from').
    timeout_s: the most the whole check may take.

  Returns:
    as_path(path).

  Raises:
    StorageError: naming `what` and the path, and saying what to fix.
  """
  p = as_path(path)
  if _scheme(p) != 'gs':
    return p
  where = f'{what} {os.fspath(p)}'
  bucket, prefix = split_gcs(p)
  if not _BUCKET.match(bucket):
    raise StorageError(
        f'{where}: {bucket!r} is not a valid GCS bucket name (3-63 characters'
        ' of a-z, 0-9, -, _ and ., starting and ending with a letter/digit)')
  deadline = time.monotonic() + timeout_s
  for endpoint in sorted({gcsfs_endpoint(), tensorstore_endpoint()}):
    _check_connects(endpoint, where, min(3.0, timeout_s))
  try:
    _run_in_thread(
        lambda: _gcsfs_list_one(bucket, prefix, deadline - time.monotonic()),
        max(0.1, deadline - time.monotonic()))
  except (TimeoutError, asyncio.TimeoutError) as e:
    raise StorageError(
        f'{where}: no answer from {gcsfs_endpoint()} (gcsfs, used by epath) '
        f'within {timeout_s:.0f} s. ' + _endpoint_hint()) from e
  except Exception as e:  # pylint: disable=broad-except
    raise StorageError(_explain(e, where, bucket, 'gcsfs')) from e
  _probe_tensorstore(bucket, prefix, where, deadline)
  return p


def check_dataset_dir(data_dir) -> epath.Path:
  """The data_dir as a path, refused early where grain cannot read it.

  grain reads ArrayRecord files through array_record's C++ reader, which opens
  local files and gs:// (it bundles Google's C++ GCS client; no TensorFlow
  needed). That client has its own endpoint override,
  CLOUD_STORAGE_EMULATOR_ENDPOINT, and hangs for a long time when GCS cannot
  be reached, so a gs:// data_dir is checked first. Every random-access record
  read is one HTTP request there: for speed, copy the data to local disk.

  Args:
    data_dir: local path or gs://bucket/dir (tfds data_dir).

  Returns:
    as_path(data_dir).

  Raises:
    StorageError: for s3:// and other schemes the reader cannot open, an
      unreachable gs:// location, or an emulator set up for gcsfs but not
      for the C++ reader.
  """
  p = as_path(data_dir)
  scheme = _scheme(p)
  if scheme is None:
    return p
  if scheme != 'gs':
    raise StorageError(
        f'data_dir {os.fspath(p)}: ArrayRecord files can only be read from '
        'local disk or gs://; copy them to local disk, or for GCS '
        + _GCSFUSE_HINT)
  check_reachable(p, 'data_dir')
  emulator = os.environ.get('STORAGE_EMULATOR_HOST', '')
  if emulator not in ('', 'default') and (
      os.environ.get('CLOUD_STORAGE_EMULATOR_ENDPOINT') != gcsfs_endpoint()):
    raise StorageError(
        f'data_dir {os.fspath(p)}: STORAGE_EMULATOR_HOST sends epath to '
        f'{gcsfs_endpoint()}, but the ArrayRecord reader only follows '
        f'CLOUD_STORAGE_EMULATOR_ENDPOINT; set it to {gcsfs_endpoint()}')
  return p
