"""A local Google Cloud Storage for tests: no internet, no credentials.

`gcp-storage-emulator` serves the GCS JSON API from a thread of the test
process (in memory). Fixtures:

  gcs_server (session): the running emulator, a `GcsEmulator`.
  gcs (function):       the same emulator with this process's environment and
                        client caches pointed at it for one test; restored
                        afterwards. Use `gcs.bucket()` for a fresh bucket and
                        `gcs.subprocess_env()` for `subprocess.run(env=...)`.

Use them from a test module with
  from gcs_emulator import gcs, gcs_server  # pylint: disable=unused-import

Every client needs its own setting (see `client_env`):
  gcsfs (epath)       STORAGE_EMULATOR_HOST, token 'anon' (FSSPEC_GCS_TOKEN),
                      GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false;
  tensorstore (Orbax) TENSORSTORE_GCS_HTTP_URL, GOOGLE_AUTH_TOKEN_FOR_TESTING;
  array_record (C++)  CLOUD_STORAGE_EMULATOR_ENDPOINT.
"""

import itertools
import json
import logging
import os
import socket
import sys
import urllib.request

import pytest

_BUCKET_NUMBERS = itertools.count()


def free_port() -> int:
  """A localhost TCP port nothing listens on (closed again at once)."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def client_env(url: str) -> dict[str, str]:
  """Environment variables sending every GCS client of ours to `url`."""
  return {
      # gcsfs: the JSON API endpoint (read on every request).
      'STORAGE_EMULATOR_HOST': url,
      # fsspec turns FSSPEC_<protocol>_<arg> into GCSFileSystem(token='anon'):
      # no credential search (which pings the metadata server for ~15 s).
      # Read when fsspec is imported, so in-process `gcs` also patches
      # fsspec.config.conf.
      'FSSPEC_GCS_TOKEN': 'anon',
      # gcsfs >= 2025 by default asks the gRPC Storage Control API for each
      # bucket's layout; the emulator has no gRPC, and every call then spends
      # 60 s retrying. Read when gcsfs is imported.
      'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false',
      # google-auth, if anything still asks it: skip the metadata server.
      'NO_GCE_CHECK': 'true',
      # tensorstore (Orbax array data): endpoint and a fixed bearer token.
      'TENSORSTORE_GCS_HTTP_URL': url,
      'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'emulator-token',
      # array_record's bundled google-cloud-cpp client (grain data on gs://).
      'CLOUD_STORAGE_EMULATOR_ENDPOINT': url,
      'GOOGLE_CLOUD_PROJECT': 'vit-jax-test',
  }


class GcsEmulator:
  """A running emulator at `url` (http://127.0.0.1:PORT)."""

  def __init__(self, url: str):
    self.url = url

  def env(self) -> dict[str, str]:
    """The variables to set for this emulator (see client_env)."""
    return client_env(self.url)

  def subprocess_env(self, base: dict[str, str] | None = None
                     ) -> dict[str, str]:
    """A full environment for a child process that talks to this emulator."""
    env = dict(os.environ if base is None else base)
    env.update(self.env())
    return env

  def bucket(self, name: str | None = None) -> str:
    """Creates an empty bucket and returns 'gs://name'."""
    name = name or f'vit-test-{os.getpid()}-{next(_BUCKET_NUMBERS)}'
    request = urllib.request.Request(
        f'{self.url}/storage/v1/b?project=vit-jax-test',
        data=json.dumps({'name': name}).encode(),
        headers={'Content-Type': 'application/json'}, method='POST')
    with urllib.request.urlopen(request, timeout=10) as response:
      assert response.status == 200, response.read()
    return f'gs://{name}'


def _quiet(server):
  """Silences the emulator's per-request logs and client-hung-up tracebacks."""
  logging.getLogger('gcp_storage_emulator').setLevel(logging.CRITICAL)
  httpd = server._api._httpd  # pylint: disable=protected-access
  plain_handle_error = httpd.handle_error

  def handle_error(request, client_address):
    if not isinstance(sys.exc_info()[1], (BrokenPipeError,
                                          ConnectionResetError)):
      plain_handle_error(request, client_address)

  httpd.handle_error = handle_error


def _send_generation_headers():
  """Media downloads answer with x-goog-generation, as GCS does.

  tensorstore takes an object's generation from that header; without it every
  read gets a zero generation, and the conditional write or read that OCDBT
  (Orbax's array store) makes on a manifest it updates fails with 'Malformed
  StorageGeneration' (a train state's second batch of arrays, for example).
  """
  from gcp_storage_emulator import server  # pylint: disable=g-import-not-at-top
  from gcp_storage_emulator.handlers import objects  # pylint: disable=g-import-not-at-top
  plain = objects.download
  if getattr(plain, 'sends_generation', False):
    return

  def download(request, response, storage, *args, **kwargs):
    try:
      obj = storage.get_file_obj(request.params['bucket_name'],
                                 request.params['object_id'])
      response['x-goog-generation'] = str(obj['generation'])
      response['x-goog-metageneration'] = str(obj.get('metageneration', '1'))
    except Exception:  # pylint: disable=broad-except
      pass  # Not found: the plain handler answers 404.
    return plain(request, response, storage, *args, **kwargs)

  download.sends_generation = True
  objects.download = download  # objects.get (alt=media) calls it by this name.
  for _, methods in server.HANDLERS:
    for method, handler in list(methods.items()):
      if handler is plain:
        methods[method] = download


@pytest.fixture(scope='session')
def gcs_server():
  """The emulator, started once per test session on a free port."""
  pytest.importorskip('gcsfs')
  emulator = pytest.importorskip('gcp_storage_emulator.server')
  _send_generation_headers()
  port = free_port()
  server = emulator.create_server('127.0.0.1', port, in_memory=True)
  server.start()
  _quiet(server)
  try:
    yield GcsEmulator(f'http://127.0.0.1:{port}')
  finally:
    server.stop()


def forget_gcs_clients():
  """Drops cached gcsfs clients (epath and fsspec keep one per process)."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  import gcsfs  # pylint: disable=g-import-not-at-top
  epath.backend._FileSystemSpecBackend._get_filesystem.cache_clear()  # pylint: disable=protected-access
  gcsfs.core.GCSFileSystem.clear_instance_cache()
  if gcsfs.GCSFileSystem is not gcsfs.core.GCSFileSystem:
    gcsfs.GCSFileSystem.clear_instance_cache()


@pytest.fixture
def gcs(gcs_server, monkeypatch):
  """gcs_server, with this process pointed at it for one test."""
  import fsspec  # pylint: disable=g-import-not-at-top
  import fsspec.config  # pylint: disable=g-import-not-at-top
  import gcsfs.core  # pylint: disable=g-import-not-at-top
  for name, value in gcs_server.env().items():
    monkeypatch.setenv(name, value)
  # What the FSSPEC_/GCSFS_ variables do in a fresh process, for this one
  # (fsspec and gcsfs are imported already): anonymous token, and the plain
  # GCSFileSystem rather than the gRPC-probing ExtendedGcsFileSystem.
  monkeypatch.setitem(fsspec.config.conf, 'gcs',
                      {**fsspec.config.conf.get('gcs', {}), 'token': 'anon'})
  registry = sys.modules['fsspec.registry']._registry  # pylint: disable=protected-access
  for protocol in ('gs', 'gcs'):
    monkeypatch.setitem(registry, protocol, gcsfs.core.GCSFileSystem)
  forget_gcs_clients()
  yield gcs_server
  monkeypatch.undo()
  forget_gcs_clients()
