"""Convert ViT weights between `.npz`, Orbax, timm and Hugging Face formats.

  python -m vit_jax.convert SRC DST [--from FMT] [--to FMT] [--model NAME] [--num-heads N]
      [--patch-size Q [--image-size N] [--patch-resize pinv|bilinear]]

Formats (FMT), decided from the path unless --from/--to say otherwise:
  npz    a file ending in .npz: Google / big_vision / this project's flat arrays.
  orbax  a directory written by vit_jax.checkpoints.save_params, or a TrainCheckpointer
         directory (its latest step) or step directory (the state's params). A DST
         without a known extension is written as an Orbax params directory.
  timm   a .pth/.pt file (torch.save'd state dict) or, with --to/--from timm, a
         .safetensors file, in timm VisionTransformer names.
  hf     a directory with config.json and model.safetensors (what
         `ViTForImageClassification.from_pretrained` reads), or a .safetensors/.bin file
         in HF names. Written in the Hub's names (every transformers version loads them).
A .safetensors SRC is timm or hf by its key names; a .safetensors DST needs --to.
Reading timm or HF files needs the number of attention heads: --model NAME (e.g.
ViT-B_16) or --num-heads N (an HF directory's config.json gives it). Writing an HF
directory derives its config.json from the weights (GELU: the reference's tanh form
unless --exact-gelu; layer_norm_eps 1e-6).
--patch-size Q moves a plain ViT to patch size Q on the way (FlexiViT): the embedding
kernel by PI-resize (--patch-resize pinv, the default) or a bilinear resize, the learned
position-embedding grid resampled for the same image at the new patch. The image size
is the checkpoint's (its grid times its patch) unless --image-size says otherwise; it
must be divisible by both patch sizes.
SRC and DST may be local or gs:// paths (read and written through etils.epath / Orbax);
a gs:// location that cannot be reached fails at once, naming it.
"""

import argparse
import json
import sys
from typing import Optional

import numpy as np

from vit_jax import checkpoints, models, storage
from vit_jax.cli import errors as cli_errors
from vit_jax.models import patch_resize

FORMATS = ("npz", "orbax", "timm", "hf")
_TORCH_SUFFIXES = (".pth", ".pt", ".bin")


def detect_format(path, *, output: bool) -> str:
  """The format a path names (see the module docstring); ValueError when it cannot tell."""
  path = storage.as_path(path)
  suffix = path.suffix.lower()
  if suffix == ".npz":
    return "npz"
  if suffix in (".pth", ".pt"):
    return "timm"
  if suffix in (".safetensors", ".bin"):
    if output:
      raise ValueError(f"{path}: a {suffix} file may hold timm or HF names; pass --to timm "
                       "or --to hf.")
    return _torch_file_format(path)
  if path.is_dir():
    return "hf" if (path / "config.json").exists() else "orbax"
  if output:
    return "orbax"
  raise ValueError(f"{path} does not exist or is not a known format ({', '.join(FORMATS)}); "
                   "pass --from.")


def _torch_file_format(path) -> str:
  keys = _read_state_dict(path).keys()
  if any(k.startswith(("vit.", "embeddings.")) for k in keys):
    return "hf"
  if any(k.startswith(("patch_embed.", "blocks.")) for k in keys):
    return "timm"
  raise ValueError(f"{path}: neither timm nor HF ViT key names (first keys: {sorted(keys)[:5]}).")


def _read_state_dict(path) -> dict:
  path = storage.as_path(path)
  if path.suffix == ".safetensors":
    import safetensors.numpy
    return safetensors.numpy.load(path.read_bytes())
  import torch
  with path.open("rb") as f:
    state = torch.load(f, map_location="cpu", weights_only=True)
  for wrapper in ("state_dict", "model"):
    if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
      state = state[wrapper]
  return state


def _write_state_dict(path, state: dict) -> None:
  path = storage.as_path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  if path.suffix == ".safetensors":
    import safetensors.numpy
    path.write_bytes(safetensors.numpy.save(state))
    return
  import torch
  with path.open("wb") as f:
    torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}, f)


def read(path, fmt: str, *, num_heads: Optional[int] = None) -> dict:
  """Params (nested numpy dict, our per-layer layout) from `path` in format `fmt`."""
  from vit_jax.interop import hf, timm
  path = storage.as_path(path)
  if fmt in ("npz", "orbax"):
    return checkpoints.read_params(path)
  if fmt == "hf" and path.is_dir():
    config = json.loads((path / "config.json").read_text())
    num_heads = num_heads or config.get("num_attention_heads")
    files = [path / n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).exists()]
    if not files:
      raise FileNotFoundError(f"{path} has no model.safetensors or pytorch_model.bin.")
    path = files[0]
  if not num_heads:
    raise ValueError(f"Reading {fmt} weights needs the number of attention heads: pass "
                     "--model NAME (e.g. ViT-B_16) or --num-heads N.")
  state = _read_state_dict(path)
  return (timm.from_timm if fmt == "timm" else hf.from_hf)(state, num_heads=num_heads)


def infer_config(params, base=None):
  """A model config with the sizes `params` imply (heads from the q kernel's shape)."""
  config = (base or models.base_config()).copy_and_resolve_references()
  block = params["Transformer"]["encoderblock_0"]
  query = block["MultiHeadDotProductAttention_0"]["query"]["kernel"]
  config.hidden_size, config.num_heads, _ = query.shape
  config.mlp_dim = block["MlpBlock_0"]["Dense_0"]["kernel"].shape[1]
  config.num_layers = sum(k.startswith("encoderblock_") for k in params["Transformer"])
  config.patch_size = params["embedding"]["kernel"].shape[0]
  config.classifier = "token" if "cls" in params else "gap"
  rep = params.get("pre_logits")
  config.representation_size = None if rep is None else rep["kernel"].shape[1]
  tokens = params["Transformer"]["posembed_input"]["pos_embedding"].shape[1]
  side = int(round(np.sqrt(tokens - ("cls" in params))))
  if config.resnet_layers is None:
    config.image_size = side * config.patch_size
  return config


def write(path, fmt: str, params, *, model_config=None, exact_gelu: bool = False) -> None:
  """Writes params to `path` in format `fmt`."""
  from vit_jax.interop import hf, timm
  path = storage.as_path(path)
  if fmt == "npz":
    checkpoints.save_npz(path, params)
  elif fmt == "orbax":
    checkpoints.save_params(path, params)
  elif fmt == "timm":
    _write_state_dict(path, timm.to_timm(params))
  elif fmt == "hf" and path.suffix in (".safetensors", ".bin"):
    _write_state_dict(path, hf.to_hf(params))
  elif fmt == "hf":
    config = infer_config(params, model_config)
    config.approximate_gelu = not exact_gelu
    num_classes = params["head"]["kernel"].shape[1] if "head" in params else None
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(hf.hf_config(config, num_classes).to_json_string())
    _write_state_dict(path / "model.safetensors", hf.to_hf(params))
  else:
    raise ValueError(f"Unknown format {fmt!r}; choose one of {FORMATS}.")


def trained_image_size(params) -> int:
  """The square image size a plain ViT checkpoint was trained at (grid side x patch)."""
  flat = models.params.flatten(params)
  patch = flat[patch_resize.EMBEDDING_KEY].shape[0]
  if patch_resize.POSEMB_KEY not in flat:
    raise ValueError("The checkpoint has no learned position embeddings to read its image "
                     "size from; pass --image-size.")
  tokens = flat[patch_resize.POSEMB_KEY].shape[1] - (models.params.CLS in flat)
  side = int(round(np.sqrt(tokens)))
  if side * side != tokens:
    raise ValueError(f"The position embeddings' {tokens} grid tokens are not a square "
                     "grid; pass --image-size.")
  return side * patch


def change_patch_size(params, patch_size: int, image_size: Optional[int] = None,
                      method: str = "pinv") -> dict:
  """`params` moved to `patch_size` (see the module docstring); ValueError if impossible."""
  image_size = image_size or trained_image_size(params)
  return patch_resize.change_patch_size(params, patch_size, image_size, method=method)


def convert(src, dst, *, src_format=None, dst_format=None, model: Optional[str] = None,
            num_heads: Optional[int] = None, exact_gelu: bool = False,
            patch_size: Optional[int] = None, image_size: Optional[int] = None,
            patch_resize_method: str = "pinv") -> dict:
  """Converts `src` to `dst`; returns {'from', 'to', 'arrays', 'parameters'}."""
  storage.check_reachable(src, "SRC")
  storage.check_reachable(dst, "DST")
  model_config = models.get_config(model) if model else None
  src_format = src_format or detect_format(src, output=False)
  dst_format = dst_format or detect_format(dst, output=True)
  heads = num_heads or (model_config.num_heads if model_config else None)
  params = read(src, src_format, num_heads=heads)
  if set(params) == {"params"}:
    params = params["params"]
  if patch_size:
    params = change_patch_size(params, patch_size, image_size, patch_resize_method)
  elif image_size:
    raise ValueError("--image-size is only used with --patch-size.")
  write(dst, dst_format, params, model_config=model_config, exact_gelu=exact_gelu)
  leaves = models.params.flatten(params).values()
  return {"from": src_format, "to": dst_format, "arrays": len(leaves),
          "parameters": int(sum(np.size(x) for x in leaves))}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m vit_jax.convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("src")
  parser.add_argument("dst")
  parser.add_argument("--from", dest="src_format", choices=FORMATS)
  parser.add_argument("--to", dest="dst_format", choices=FORMATS)
  parser.add_argument("--model", choices=models.MODEL_NAMES, metavar="NAME",
                      help="a model name (gives num_heads and the HF config's base)")
  parser.add_argument("--num-heads", type=int)
  parser.add_argument("--exact-gelu", action="store_true",
                      help="HF config: exact GELU (timm/HF-trained weights) instead of tanh")
  parser.add_argument("--verbosity", type=int, default=0,
                      help="1: print the traceback of an error too")
  parser.add_argument("--patch-size", type=int, metavar="Q",
                      help="move a plain ViT to patch size Q (FlexiViT PI-resize)")
  parser.add_argument("--image-size", type=int, metavar="N",
                      help="with --patch-size: the image size (default: the checkpoint's)")
  parser.add_argument("--patch-resize", choices=patch_resize.RESIZE_METHODS, default="pinv",
                      help="with --patch-size: how the embedding kernel is resized")
  args = parser.parse_args(argv)
  try:
    summary = convert(args.src, args.dst, src_format=args.src_format,
                      dst_format=args.dst_format, model=args.model, num_heads=args.num_heads,
                      exact_gelu=args.exact_gelu, patch_size=args.patch_size,
                      image_size=args.image_size, patch_resize_method=args.patch_resize)
  except cli_errors.INPUT_ERRORS as e:  # A bad path, format or file: one message.
    cli_errors.report(e, argv)
    return 2
  print(f"{args.src} ({summary['from']}) -> {args.dst} ({summary['to']}): "
        f"{summary['arrays']} arrays, {summary['parameters']:,} parameters")
  return 0


if __name__ == "__main__":
  sys.exit(main())
