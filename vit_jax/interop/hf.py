"""Our ViT parameters <-> Hugging Face `ViTModel` / `ViTForImageClassification` state dicts.

Names (ours -> HF `ViTModel` as in the Hub's files; `ViTForImageClassification` adds
`vit.` before each and keeps the head as `classifier`; transformers 5 renames the block
layers in memory (layers.i.attention.{q,k,v,o}_proj, mlp.fc1/fc2), both are read):
  embedding -> embeddings.patch_embeddings.projection; cls -> embeddings.cls_token;
  Transformer/posembed_input/pos_embedding -> embeddings.position_embeddings;
  encoderblock_i/LayerNorm_0, LayerNorm_1 -> encoder.layer.i.layernorm_before, layernorm_after;
  MultiHeadDotProductAttention_0/{query,key,value} -> encoder.layer.i.attention.attention.*;
  .../out -> encoder.layer.i.attention.output.dense;
  MlpBlock_0/Dense_0, Dense_1 -> encoder.layer.i.intermediate.dense, output.dense;
  encoder_norm -> layernorm; pre_logits -> pooler.dense (ViTModel; tanh in both);
  head -> classifier (ViTForImageClassification).
HF's ViT always has a class token ('token' classifier) and learned 1-D position embeddings.
Its config defaults to layer_norm_eps=1e-12; `hf_config` sets our 1e-6.
"""

from typing import Optional

import numpy as np

from vit_jax.interop import common
from vit_jax.models import params as names

# Per-block names: "hub" as in the files on the Hugging Face Hub (transformers 4.x, which
# transformers 5 renames on load), "v5" as in transformers 5's modules.
_BLOCK_NAMES = {
    "hub": {
        names.ATTENTION_NORM: "layernorm_before", names.MLP_NORM: "layernorm_after",
        names.MLP_IN: "intermediate.dense", names.MLP_OUT: "output.dense",
        f"{names.ATTENTION}/query": "attention.attention.query",
        f"{names.ATTENTION}/key": "attention.attention.key",
        f"{names.ATTENTION}/value": "attention.attention.value",
        f"{names.ATTENTION}/{names.ATTENTION_OUT}": "attention.output.dense",
    },
    "v5": {
        names.ATTENTION_NORM: "layernorm_before", names.MLP_NORM: "layernorm_after",
        names.MLP_IN: "mlp.fc1", names.MLP_OUT: "mlp.fc2",
        f"{names.ATTENTION}/query": "attention.q_proj",
        f"{names.ATTENTION}/key": "attention.k_proj",
        f"{names.ATTENTION}/value": "attention.v_proj",
        f"{names.ATTENTION}/{names.ATTENTION_OUT}": "attention.o_proj",
    },
}
_LAYERS = {"hub": "encoder.layer.{}.", "v5": "layers.{}."}
NAMINGS = tuple(_LAYERS)


def _rules(prefix: str, naming: str) -> list:
  if naming not in NAMINGS:
    raise ValueError(f"Unknown HF naming {naming!r}; choose one of {NAMINGS}.")
  body = [
      (f"{names.EMBEDDING}/kernel", "embeddings.patch_embeddings.projection.weight", "conv"),
      (f"{names.EMBEDDING}/bias", "embeddings.patch_embeddings.projection.bias", "raw"),
      (names.CLS, "embeddings.cls_token", "raw"),
      (names.POSEMB, "embeddings.position_embeddings", "raw"),
      (f"{names.TRANSFORMER}/{names.ENCODER_NORM}/scale", "layernorm.weight", "raw"),
      (f"{names.TRANSFORMER}/{names.ENCODER_NORM}/bias", "layernorm.bias", "raw"),
      (f"{names.PRE_LOGITS}/kernel", "pooler.dense.weight", "linear"),
      (f"{names.PRE_LOGITS}/bias", "pooler.dense.bias", "raw"),
  ] + common.encoder_rules(_LAYERS[naming], _BLOCK_NAMES[naming])
  rules = [(ours, prefix + theirs, kind) for ours, theirs, kind in body]
  return rules + [(f"{names.HEAD}/kernel", "classifier.weight", "linear"),
                  (f"{names.HEAD}/bias", "classifier.bias", "raw")]


def to_hf(params, *, for_classification: Optional[bool] = None,
          naming: str = "hub") -> dict[str, np.ndarray]:
  """Our params -> an HF ViT state dict (numpy).

  `naming`: 'hub' (default) writes the key names of the published HF ViT files, which
  every transformers version loads; 'v5' those of transformers 5's `state_dict()`.

  `for_classification` (default: whether params have a head) picks
  ViTForImageClassification keys (`vit.` prefix, `classifier`) over ViTModel keys.
  """
  flat = common.flat_numpy(params)
  if names.CLS not in flat:
    raise ValueError("HF's ViT always uses a class token; this model has none "
                     "(classifier 'gap'?). Export it to timm instead.")
  has_head = any(k.startswith(f"{names.HEAD}/") for k in flat)
  if for_classification is None:
    for_classification = has_head
  if for_classification and any(k.startswith(f"{names.PRE_LOGITS}/") for k in flat):
    raise ValueError("ViTForImageClassification has no pre_logits layer; export with "
                     "for_classification=False (ViTModel: pre_logits is its pooler).")
  if not for_classification and has_head:
    flat = {k: v for k, v in flat.items() if not k.startswith(f"{names.HEAD}/")}
  out, used = common.apply_rules(flat, _rules("vit." if for_classification else "", naming),
                                 to_torch=True)
  common.check_consumed(flat, used, "parameter")
  return out


def from_hf(state_dict: dict, *, num_heads: int) -> dict:
  """HF ViTModel or ViTForImageClassification state dict (either naming) -> our params."""
  sd = {k: common.to_numpy(v) for k, v in state_dict.items()}
  prefix = "vit." if any(k.startswith("vit.") for k in sd) else ""
  naming = "v5" if any(k.startswith(prefix + "layers.") for k in sd) else "hub"
  flat, used = common.apply_rules(sd, _rules(prefix, naming), to_torch=False,
                                  num_heads=num_heads)
  common.check_consumed(sd, used, "Hugging Face")
  return names.unflatten(flat)


def hf_config(model_config, num_classes: Optional[int] = None, img_size: Optional[int] = None):
  """A `transformers.ViTConfig` for the same architecture (imports transformers).

  layer_norm_eps=1e-6 (ours; HF's default is 1e-12), hidden_act 'gelu' (exact) or
  'gelu_pytorch_tanh' (the reference's tanh form) after approximate_gelu.
  """
  from transformers import ViTConfig

  c = model_config
  if c.classifier != "token" or c.posemb != "learn" or c.resnet_layers is not None:
    raise ValueError("HF's ViT is a plain ViT with a class token and learned position "
                     f"embeddings; this model has classifier={c.classifier!r}, "
                     f"posemb={c.posemb!r}, resnet_layers={c.resnet_layers!r}.")
  kwargs = dict(
      hidden_size=c.hidden_size, num_hidden_layers=c.num_layers,
      num_attention_heads=c.num_heads, intermediate_size=c.mlp_dim,
      hidden_act="gelu_pytorch_tanh" if c.approximate_gelu else "gelu",
      layer_norm_eps=1e-6, image_size=img_size or c.image_size, patch_size=c.patch_size,
      num_channels=c.num_channels, qkv_bias=True, encoder_stride=c.patch_size)
  if c.representation_size is not None:
    kwargs.update(pooler_output_size=c.representation_size, pooler_act="tanh")
  if num_classes is not None:
    kwargs["num_labels"] = num_classes
  return ViTConfig(**kwargs)
