"""The ViT model family: `get_config(name)` and `create(name, num_classes=..., **overrides)`."""

import ml_collections

from vit_jax.models.configs import MODEL_NAMES, base_config, get_config
from vit_jax.models.vit import CLASSIFIERS, MAPHead, VisionTransformer
from vit_jax.models.posembed import POSEMB_TYPES
from vit_jax.models.layout import scan_to_unrolled, unrolled_to_scan

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
           "create", "from_config", "get_config", "scan_to_unrolled", "unrolled_to_scan"]
