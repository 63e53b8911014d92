"""Paths for workdirs, checkpoints and data: local disk or object storage (gs://)."""

from vit_jax.storage.paths import as_path
from vit_jax.storage.paths import check_dataset_dir
from vit_jax.storage.paths import check_reachable
from vit_jax.storage.paths import is_remote
from vit_jax.storage.paths import StorageError

__all__ = [
    'as_path', 'check_dataset_dir', 'check_reachable', 'is_remote',
    'StorageError',
]
