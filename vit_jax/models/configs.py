"""Named model configurations, with the names of Google's reference checkpoints."""

import ml_collections
from ml_collections import config_dict

# (hidden_size, mlp_dim, num_heads, num_layers) per transformer size.
_SIZES = {
    "testing": (32, 128, 2, 2),
    "Ti": (192, 768, 3, 12),
    "S": (384, 1536, 6, 12),
    "B": (768, 3072, 12, 12),
    "L": (1024, 4096, 16, 24),
    "H": (1280, 5120, 16, 32),
}


def base_config() -> ml_collections.ConfigDict:
  """Every field of `VisionTransformer` (except num_classes) plus `name` and `image_size`."""
  c = ml_collections.ConfigDict()
  c.name = "ViT-B_16"
  c.image_size = 224  # The resolution the model is built and shape-checked for.
  c.patch_size = 16
  c.hidden_size, c.mlp_dim, c.num_heads, c.num_layers = _SIZES["B"]
  c.classifier = "token"
  c.representation_size = config_dict.placeholder(int)
  c.resnet_layers = config_dict.placeholder(tuple)
  c.resnet_width_factor = 1
  c.ws_form = "reference"  # Hybrids: 'reference' (Google) or 'timm' weight standardisation.
  c.posemb = "learn"
  c.dropout_rate = 0.0
  c.attention_dropout_rate = 0.0
  c.stochastic_depth = 0.0
  c.approximate_gelu = True
  c.head_bias_init = 0.0
  c.num_channels = 3
  c.dtype = "float32"
  c.scan = False
  c.remat_policy = "none"
  c.attention_impl = "auto"
  return c


def _vit(name, size, patch, dropout=0.0, resnet_layers=None, image_size=224):
  c = base_config()
  c.name = name
  c.image_size = image_size
  c.patch_size = patch
  c.hidden_size, c.mlp_dim, c.num_heads, c.num_layers = _SIZES[size]
  c.dropout_rate = dropout
  if resnet_layers is not None:
    c.resnet_layers = tuple(resnet_layers)
  return c


def _registry():
  models = [
      _vit("testing", "testing", 4, image_size=16),
      _vit("ViT-Ti_16", "Ti", 16),
      _vit("ViT-S_16", "S", 16),
      _vit("ViT-S_32", "S", 32),
      _vit("ViT-B_8", "B", 8),
      _vit("ViT-B_16", "B", 16),
      _vit("ViT-B_32", "B", 32),
      _vit("ViT-L_16", "L", 16, dropout=0.1),
      _vit("ViT-L_32", "L", 32, dropout=0.1),
      _vit("ViT-H_14", "H", 14, dropout=0.1),
      # Hybrids: the ResNet does the downsampling, the ViT embeds its feature map.
      _vit("R+ViT-Ti_16", "Ti", 8, resnet_layers=()),
      _vit("R26+ViT-S_32", "S", 1, resnet_layers=(2, 2, 2, 2)),
      _vit("R26+ViT-B_32", "B", 1, resnet_layers=(2, 2, 2, 2)),
      _vit("R50+ViT-B_16", "B", 1, dropout=0.1, resnet_layers=(3, 4, 9)),
      _vit("R50+ViT-L_32", "L", 1, dropout=0.1, resnet_layers=(3, 4, 6, 3)),
  ]
  for c in list(models):
    if c.name.startswith("ViT-"):
      gap = c.copy_and_resolve_references()
      gap.name = f"{c.name}-gap-norep"
      gap.classifier = "gap"
      models.append(gap)
  return {c.name: c for c in models}


MODEL_CONFIGS = _registry()
MODEL_NAMES = tuple(MODEL_CONFIGS)


def get_config(name: str) -> ml_collections.ConfigDict:
  """A fresh copy of the named model's config; ValueError listing the names if unknown."""
  if name not in MODEL_CONFIGS:
    raise ValueError(f"Unknown model name {name!r}. Valid names: {', '.join(MODEL_NAMES)}.")
  return MODEL_CONFIGS[name].copy_and_resolve_references()
