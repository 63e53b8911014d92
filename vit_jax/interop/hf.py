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

from vit_jax import checkpoint
from vit_jax.interop import common
from vit_jax.interop.timm import _flat_numpy, _numpy

# Per-block names: "hub" as in the files on the Hugging Face Hub (transformers 4.x, which
# transformers 5 renames on load), "v5" as in transformers 5's modules.
_BLOCK_NAMES = {
    "hub": {
        "LayerNorm_0": "layernorm_before", "LayerNorm_1": "layernorm_after",
        "MlpBlock_0/Dense_0": "intermediate.dense", "MlpBlock_0/Dense_1": "output.dense",
        "MultiHeadDotProductAttention_0/query": "attention.attention.query",
        "MultiHeadDotProductAttention_0/key": "attention.attention.key",
        "MultiHeadDotProductAttention_0/value": "attention.attention.value",
        "MultiHeadDotProductAttention_0/out": "attention.output.dense",
    },
    "v5": {
        "LayerNorm_0": "layernorm_before", "LayerNorm_1": "layernorm_after",
        "MlpBlock_0/Dense_0": "mlp.fc1", "MlpBlock_0/Dense_1": "mlp.fc2",
        "MultiHeadDotProductAttention_0/query": "attention.q_proj",
        "MultiHeadDotProductAttention_0/key": "attention.k_proj",
        "MultiHeadDotProductAttention_0/value": "attention.v_proj",
        "MultiHeadDotProductAttention_0/out": "attention.o_proj",
    },
}
_LAYERS = {"hub": "encoder.layer.{}.", "v5": "layers.{}."}
NAMINGS = tuple(_LAYERS)


def _rules(prefix: str, naming: str) -> list:
  if naming not in NAMINGS:
    raise ValueError(f"Unknown HF naming {naming!r}; choose one of {NAMINGS}.")
  body = [
      ("embedding/kernel", "embeddings.patch_embeddings.projection.weight", "conv"),
      ("embedding/bias", "embeddings.patch_embeddings.projection.bias", "raw"),
      ("cls", "embeddings.cls_token", "raw"),
      ("Transformer/posembed_input/pos_embedding", "embeddings.position_embeddings", "raw"),
      ("Transformer/encoder_norm/scale", "layernorm.weight", "raw"),
      ("Transformer/encoder_norm/bias", "layernorm.bias", "raw"),
      ("pre_logits/kernel", "pooler.dense.weight", "linear"),
      ("pre_logits/bias", "pooler.dense.bias", "raw"),
  ] + common.encoder_rules(_LAYERS[naming], _BLOCK_NAMES[naming])
  rules = [(ours, prefix + theirs, kind) for ours, theirs, kind in body]
  return rules + [("head/kernel", "classifier.weight", "linear"),
                  ("head/bias", "classifier.bias", "raw")]


def to_hf(params, *, for_classification: Optional[bool] = None,
          naming: str = "hub") -> dict[str, np.ndarray]:
  """Our params -> an HF ViT state dict (numpy).

  `naming`: 'hub' (default) writes the key names of the published HF ViT files, which
  every transformers version loads; 'v5' those of transformers 5's `state_dict()`.

  `for_classification` (default: whether params have a head) picks
  ViTForImageClassification keys (`vit.` prefix, `classifier`) over ViTModel keys.
  """
  flat = _flat_numpy(params)
  if "cls" not in flat:
    raise ValueError("HF's ViT always uses a class token; this model has none "
                     "(classifier 'gap'?). Export it to timm instead.")
  has_head = any(k.startswith("head/") for k in flat)
  if for_classification is None:
    for_classification = has_head
  if for_classification and any(k.startswith("pre_logits/") for k in flat):
    raise ValueError("ViTForImageClassification has no pre_logits layer; export with "
                     "for_classification=False (ViTModel: pre_logits is its pooler).")
  if not for_classification and has_head:
    flat = {k: v for k, v in flat.items() if not k.startswith("head/")}
  out, used = common.apply_rules(flat, _rules("vit." if for_classification else "", naming),
                                 to_torch=True)
  common.check_consumed(flat, used, "parameter")
  return out


def from_hf(state_dict: dict, *, num_heads: int) -> dict:
  """HF ViTModel or ViTForImageClassification state dict (either naming) -> our params."""
  sd = {k: _numpy(v) for k, v in state_dict.items()}
  prefix = "vit." if any(k.startswith("vit.") for k in sd) else ""
  naming = "v5" if any(k.startswith(prefix + "layers.") for k in sd) else "hub"
  flat, used = common.apply_rules(sd, _rules(prefix, naming), to_torch=False,
                                  num_heads=num_heads)
  common.check_consumed(sd, used, "Hugging Face")
  return checkpoint.unflatten(flat)


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
