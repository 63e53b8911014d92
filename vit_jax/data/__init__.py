"""Input pipeline: tfds ArrayRecord / image folders read with grain, no TensorFlow."""

from vit_jax.data.augment import mixup
from vit_jax.data.errors import CorruptImageError
from vit_jax.data.errors import DataError
from vit_jax.data.errors import DatasetNotPreparedError
from vit_jax.data.errors import EmptyDatasetError
from vit_jax.data.errors import UnknownDatasetError
from vit_jax.data.images import decode_image
from vit_jax.data.images import eval_transform
from vit_jax.data.images import normalize_images
from vit_jax.data.images import train_transform
from vit_jax.data.pipeline import DataIterator
from vit_jax.data.pipeline import make_eval_iterator
from vit_jax.data.pipeline import make_train_iterator
from vit_jax.data.pipeline import MeshPrefetcher
from vit_jax.data.pipeline import num_eval_batches
from vit_jax.data.pipeline import prefetch_to_mesh
from vit_jax.data.pipeline import to_global
from vit_jax.data.sources import DatasetInfo
from vit_jax.data.sources import get_info
