"""Our ViT parameters <-> timm's `VisionTransformer` state dict (plain and ResNetV2 hybrids).

Names (ours -> timm):
  embedding -> patch_embed.proj (HWIO -> OIHW); cls -> cls_token;
  Transformer/posembed_input/pos_embedding -> pos_embed;
  encoderblock_i/LayerNorm_0, LayerNorm_1 -> blocks.i.norm1, norm2;
  MultiHeadDotProductAttention_0/{query,key,value} -> blocks.i.attn.qkv (fused, q|k|v rows);
  .../out -> blocks.i.attn.proj; MlpBlock_0/Dense_0, Dense_1 -> blocks.i.mlp.fc1, fc2;
  encoder_norm -> norm; head -> head.
  Hybrid: conv_root, gn_root -> patch_embed.backbone.stem.{conv,norm} (stem-only
  R+ViT-Ti: patch_embed.backbone.{conv,norm}); blockK/unitJ/{convN,gnN,conv_proj,gn_proj}
  -> patch_embed.backbone.stages.(K-1).blocks.(J-1).{convN,normN,downsample.conv,downsample.norm}.
A 'gap' model maps to timm with class_token=False, global_pool='avg', fc_norm=False
(timm then applies `norm` before averaging, as we do). timm has no `pre_logits` layer.
"""

import re
from typing import Optional

import numpy as np

from vit_jax.interop import common
from vit_jax.models import params as names
from vit_jax.models import resnet

_BLOCK_NAMES = {
    names.ATTENTION_NORM: "norm1", names.MLP_NORM: "norm2",
    names.MLP_IN: "mlp.fc1", names.MLP_OUT: "mlp.fc2",
    f"{names.ATTENTION}/{names.ATTENTION_OUT}": "attn.proj",
}
_RULES = [
    (f"{names.EMBEDDING}/kernel", "patch_embed.proj.weight", "conv"),
    (f"{names.EMBEDDING}/bias", "patch_embed.proj.bias", "raw"),
    (names.CLS, "cls_token", "raw"),
    (names.POSEMB, "pos_embed", "raw"),
    (f"{names.TRANSFORMER}/{names.ENCODER_NORM}/scale", "norm.weight", "raw"),
    (f"{names.TRANSFORMER}/{names.ENCODER_NORM}/bias", "norm.bias", "raw"),
    (f"{names.HEAD}/kernel", "head.weight", "linear"),
    (f"{names.HEAD}/bias", "head.bias", "raw"),
] + common.encoder_rules("blocks.{}.", _BLOCK_NAMES)

_BACKBONE = "patch_embed.backbone."
_UNIT = re.compile(r"^block(\d+)/unit(\d+)/(conv\d|gn\d|conv_proj|gn_proj)/(kernel|scale|bias)$")
_STAGE = re.compile(r"^stages\.(\d+)\.blocks\.(\d+)\.(conv\d|norm\d|downsample\.conv|"
                    r"downsample\.norm)\.(weight|bias)$")
_TIMM_LAYER = {"conv_proj": "downsample.conv", "gn_proj": "downsample.norm"}


def _resnet_to_timm(flat: dict) -> tuple[dict, set]:
  """Hybrid ResNet keys -> timm ResNetV2 keys (under patch_embed.backbone.)."""
  out, used = {}, set()
  stem = "stem." if any(k.startswith("block") for k in flat) else ""
  for key, value in flat.items():
    if key in ("conv_root/kernel", "gn_root/scale", "gn_root/bias"):
      name = {"conv_root/kernel": "conv.weight", "gn_root/scale": "norm.weight",
              "gn_root/bias": "norm.bias"}[key]
      out[f"{_BACKBONE}{stem}{name}"] = (common.conv_to_torch(value) if "conv" in key
                                         else np.asarray(value))
    elif m := _UNIT.match(key):
      block, unit, layer, leaf = m.groups()
      layer = _TIMM_LAYER.get(layer, layer.replace("gn", "norm"))
      out[f"{_BACKBONE}stages.{int(block) - 1}.blocks.{int(unit) - 1}.{layer}."
          f"{'bias' if leaf == 'bias' else 'weight'}"] = (
              common.conv_to_torch(value) if leaf == "kernel" else np.asarray(value))
    else:
      continue
    used.add(key)
  return out, used


def _resnet_from_timm(state_dict: dict) -> tuple[dict, set]:
  out, used = {}, set()
  for key, value in state_dict.items():
    if not key.startswith(_BACKBONE):
      continue
    rest = key[len(_BACKBONE):].removeprefix("stem.")
    stem = {"conv.weight": "conv_root/kernel", "norm.weight": "gn_root/scale",
            "norm.bias": "gn_root/bias"}
    if rest in stem:
      out[stem[rest]] = common.conv_from_torch(value) if "conv" in rest else np.asarray(value)
    elif m := _STAGE.match(rest):
      stage, block, layer, leaf = m.groups()
      layer = {v: k for k, v in _TIMM_LAYER.items()}.get(layer, layer.replace("norm", "gn"))
      is_conv = layer.startswith("conv")
      out[f"block{int(stage) + 1}/unit{int(block) + 1}/{layer}/"
          f"{'kernel' if is_conv else ('scale' if leaf == 'weight' else 'bias')}"] = (
              common.conv_from_torch(value) if is_conv else np.asarray(value))
    else:
      continue
    used.add(key)
  return out, used


def to_timm(params) -> dict[str, np.ndarray]:
  """Our params (per-layer or scanned, maybe under 'params') -> timm state dict (numpy)."""
  flat = common.flat_numpy(params)
  if any(k.startswith(f"{names.PRE_LOGITS}/") for k in flat):
    raise ValueError("timm's VisionTransformer has no pre_logits (representation) layer; "
                     "drop it (fine-tune without representation_size) or use the HF "
                     "ViTModel export, whose pooler is that layer.")
  out, used = common.apply_rules(flat, _RULES, to_torch=True)
  for i in range(_num_layers(flat)):
    prefix = f"{names.TRANSFORMER}/{names.block_name(i)}/{names.ATTENTION}/"
    parts = [common.heads_to_torch(flat[f"{prefix}{n}/kernel"], flat[f"{prefix}{n}/bias"])
             for n in ("query", "key", "value")]
    out[f"blocks.{i}.attn.qkv.weight"] = np.concatenate([w for w, _ in parts])
    out[f"blocks.{i}.attn.qkv.bias"] = np.concatenate([b for _, b in parts])
    used |= {f"{prefix}{n}/{leaf}" for n in ("query", "key", "value")
             for leaf in ("kernel", "bias")}
  resnet, resnet_used = _resnet_to_timm(flat)
  out.update(resnet)
  common.check_consumed(flat, used | resnet_used, "parameter")
  return out


def from_timm(state_dict: dict, *, num_heads: int) -> dict:
  """timm VisionTransformer state dict (torch tensors or numpy) -> our per-layer params."""
  sd = {k: common.to_numpy(v) for k, v in state_dict.items()}
  flat, used = common.apply_rules(sd, _RULES, to_torch=False, num_heads=num_heads)
  for i in range(common.num_blocks(sd, "blocks.")):
    weight, bias = sd[f"blocks.{i}.attn.qkv.weight"], sd[f"blocks.{i}.attn.qkv.bias"]
    prefix = f"{names.TRANSFORMER}/{names.block_name(i)}/{names.ATTENTION}/"
    for name, w, b in zip(("query", "key", "value"), np.split(weight, 3), np.split(bias, 3)):
      flat[f"{prefix}{name}/kernel"], flat[f"{prefix}{name}/bias"] = common.heads_from_torch(
          w, b, num_heads)
    used |= {f"blocks.{i}.attn.qkv.weight", f"blocks.{i}.attn.qkv.bias"}
  resnet, resnet_used = _resnet_from_timm(sd)
  flat.update(resnet)
  common.check_consumed(sd, used | resnet_used, "timm")
  return names.unflatten(flat)


def timm_kwargs(model_config, num_classes: int, img_size: Optional[int] = None) -> dict:
  """Arguments of timm's VisionTransformer for the same architecture as `model_config`.

  Plain ViTs only (for hybrids see `create_timm_model`). GELU follows approximate_gelu
  ('gelu_tanh' for the reference's tanh form, exact 'gelu' otherwise); LayerNorm eps 1e-6.
  """
  c = model_config
  if c.classifier not in ("token", "gap"):
    raise ValueError(f"timm export supports classifier 'token' or 'gap', not {c.classifier!r}.")
  if c.posemb != "learn":
    raise ValueError(f"timm's VisionTransformer has learned 1-D position embeddings only; "
                     f"this model uses posemb={c.posemb!r}.")
  if c.representation_size is not None:
    raise ValueError("timm's VisionTransformer has no pre_logits (representation_size) layer.")
  gap = c.classifier == "gap"
  return dict(
      img_size=img_size or c.image_size, patch_size=c.patch_size, embed_dim=c.hidden_size,
      depth=c.num_layers, num_heads=c.num_heads, mlp_ratio=c.mlp_dim / c.hidden_size,
      num_classes=num_classes, class_token=not gap, global_pool="avg" if gap else "token",
      fc_norm=False if gap else None, act_layer="gelu_tanh" if c.approximate_gelu else "gelu",
      in_chans=c.num_channels)


def create_timm_model(model_config, num_classes: int, img_size: Optional[int] = None, *,
                      match_eps: bool = True):
  """A timm VisionTransformer with our architecture (random weights; imports timm).

  Hybrids get timm's ResNetV2 backbone, whose StdConv2d is our `ws_form='timm'`
  ((w - mean) / sqrt(var + 1e-8)); timm has no layer for the reference form. With
  `match_eps=True` (for parity) the model config must say ws_form='timm' and timm's
  GroupNorm gets our eps 1e-6 instead of its default 1e-5, which timm's pretrained
  hybrids use (`match_eps=False`).
  """
  from functools import partial
  from timm.layers import GroupNormAct, StdConv2dSame
  from timm.models import vision_transformer_hybrid as hybrid
  from timm.models.resnetv2 import ResNetV2, create_resnetv2_stem
  from timm.models.vision_transformer import VisionTransformer

  c = model_config
  if c.resnet_layers is None:
    return VisionTransformer(**timm_kwargs(c, num_classes, img_size))
  if c.resnet_width_factor != 1:
    raise ValueError("timm's hybrid ViTs use ResNet width factor 1.")
  ws_form = c.get("ws_form", "reference")
  if match_eps and ws_form != "timm":
    raise ValueError(
        f"The model config has ws_form={ws_form!r}, but timm's StdConv2d computes "
        "(w - mean) / sqrt(var + 1e-8): set ws_form='timm' in the config to match timm's "
        "outputs, or pass match_eps=False for a plain timm hybrid.")
  conv = partial(StdConv2dSame, eps=resnet.TIMM_WS_EPS)
  norm = partial(GroupNormAct, num_groups=32, eps=1e-6 if match_eps else 1e-5)
  if len(c.resnet_layers):
    backbone = ResNetV2(layers=tuple(c.resnet_layers), num_classes=0, global_pool="",
                        in_chans=c.num_channels, preact=False, stem_type="same",
                        conv_layer=conv, norm_layer=norm)
  else:
    backbone = create_resnetv2_stem(c.num_channels, stem_type="same", preact=False,
                                    conv_layer=conv, norm_layer=norm)
  kwargs = timm_kwargs(c, num_classes, img_size)
  kwargs["embed_layer"] = partial(hybrid.HybridEmbed, backbone=backbone)
  return VisionTransformer(**kwargs)


def _num_layers(flat: dict) -> int:
  ids = {int(m.group(1)) for k in flat if (m := re.match(rf"{names.TRANSFORMER}/{names.SCANNED_BLOCK}_(\d+)/", k))}
  return len(ids)
