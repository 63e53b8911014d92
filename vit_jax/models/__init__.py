"""The ViT model family: `get_config(name)` and `create(name, num_classes=..., **overrides)`."""

import jax
import ml_collections

from vit_jax.models.configs import MODEL_NAMES, base_config, get_config
from vit_jax.models.vit import CLASSIFIERS, MAPHead, VisionTransformer
from vit_jax.models.posembed import POSEMB_TYPES
from vit_jax.models.params import count_params, flatten, scan_to_unrolled, unrolled_to_scan
from vit_jax.models.posemb_resample import RESAMPLE_METHODS, resample_grid, resample_posemb

# Config fields that describe the model but are not module attributes.
_NON_MODULE_FIELDS = ("name", "image_size")


def from_config(config: ml_collections.ConfigDict, num_classes) -> VisionTransformer:
  """The module a model config (as from `get_config`, maybe edited) describes."""
  kwargs = {k: v for k, v in config.to_dict().items() if k not in _NON_MODULE_FIELDS}
  valid = set(base_config().to_dict())
  unknown = sorted(set(kwargs) - valid)
  if unknown:
    raise ValueError(f"Unknown model config field(s) {unknown}; valid fields: {sorted(valid)}.")
  if kwargs.get("resnet_layers") is not None:
    kwargs["resnet_layers"] = tuple(kwargs["resnet_layers"])
  return VisionTransformer(num_classes=num_classes, **kwargs)


def param_shapes(model, image_size: int, num_channels: int = 3) -> dict:
  """Flat {'path/to/param': ShapeDtypeStruct} of a model's parameters (no allocation)."""
  images = jax.numpy.zeros((1, image_size, image_size, num_channels), jax.numpy.float32)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), images))
  return flatten(variables["params"])


def create(name: str, num_classes=1000, **overrides) -> VisionTransformer:
  """The named model with `overrides` applied to its config (e.g. classifier='gap')."""
  config = get_config(name)
  unknown = sorted(set(overrides) - set(config.keys()))
  if unknown:
    raise ValueError(f"Unknown model option(s) {unknown}; valid options: "
                     f"{sorted(config.keys())}.")
  config.update(overrides)
  return from_config(config, num_classes)


__all__ = ["CLASSIFIERS", "MAPHead", "MODEL_NAMES", "POSEMB_TYPES", "VisionTransformer",
           "RESAMPLE_METHODS", "count_params", "create", "from_config", "get_config", "param_shapes",
           "resample_grid", "resample_posemb", "scan_to_unrolled", "unrolled_to_scan"]
