"""Layout helpers shared by the timm and Hugging Face mappings (numpy only).

Flax kernels are [in, out] (Dense), HWIO (conv), [dim, heads, head_dim] (q/k/v) and
[heads, head_dim, dim] (attention out); PyTorch weights are [out, in] and OIHW.
"""

import numpy as np

from vit_jax.models import params as names


def to_numpy(value) -> np.ndarray:
  """A torch tensor (bfloat16 widened to float32) or array-like -> numpy array."""
  if hasattr(value, "detach"):
    value = value.detach().cpu()
    if str(value.dtype) == "torch.bfloat16":
      value = value.float()
    return value.numpy()
  return np.asarray(value)


def flat_numpy(params) -> dict:
  """Our params (per-layer or scanned, optionally under 'params') -> {'a/b/c': ndarray}."""
  if set(params) == {"params"}:
    params = params["params"]
  params = {k: v for k, v in params.items()}
  if names.TRANSFORMER in params:
    params = names.scan_to_unrolled(params)
  return {k: np.asarray(v) for k, v in names.flatten(params).items()}


def linear_to_torch(kernel) -> np.ndarray:
  """Dense kernel [in, out] -> nn.Linear weight [out, in]."""
  return np.ascontiguousarray(np.asarray(kernel).T)


def linear_from_torch(weight) -> np.ndarray:
  return np.ascontiguousarray(np.asarray(weight).T)


def conv_to_torch(kernel) -> np.ndarray:
  """Conv kernel HWIO -> OIHW."""
  return np.ascontiguousarray(np.asarray(kernel).transpose(3, 2, 0, 1))


def conv_from_torch(weight) -> np.ndarray:
  """Conv weight OIHW -> HWIO."""
  return np.ascontiguousarray(np.asarray(weight).transpose(2, 3, 1, 0))


def heads_to_torch(kernel, bias) -> tuple[np.ndarray, np.ndarray]:
  """q/k/v kernel [dim, heads, head_dim], bias [heads, head_dim] -> weight [h*d, dim], bias [h*d]."""
  kernel = np.asarray(kernel)
  return linear_to_torch(kernel.reshape(kernel.shape[0], -1)), np.asarray(bias).reshape(-1)


def check_heads(width: int, num_heads: int) -> None:
  if width % num_heads:
    raise ValueError(f"A projection of width {width} cannot be split into {num_heads} heads; "
                     "pass the model's num_heads (e.g. --model NAME).")


def heads_from_torch(weight, bias, num_heads: int) -> tuple[np.ndarray, np.ndarray]:
  """Inverse of `heads_to_torch`."""
  weight = np.asarray(weight)
  out, dim = weight.shape
  check_heads(out, num_heads)
  kernel = linear_from_torch(weight).reshape(dim, num_heads, out // num_heads)
  return kernel, np.asarray(bias).reshape(num_heads, out // num_heads)


def out_to_torch(kernel) -> np.ndarray:
  """Attention out kernel [heads, head_dim, dim] -> weight [dim, heads * head_dim]."""
  kernel = np.asarray(kernel)
  return linear_to_torch(kernel.reshape(-1, kernel.shape[-1]))


def out_from_torch(weight, num_heads: int) -> np.ndarray:
  weight = np.asarray(weight)
  dim, inner = weight.shape
  check_heads(inner, num_heads)
  return linear_from_torch(weight).reshape(num_heads, inner // num_heads, dim)


def num_blocks(state_dict: dict, prefix: str) -> int:
  """How many `prefix{i}.` blocks a state dict has (0..n-1)."""
  ids = {int(k[len(prefix):].split(".")[0]) for k in state_dict if k.startswith(prefix)}
  if ids != set(range(len(ids))):
    raise ValueError(f"Blocks {sorted(ids)} under '{prefix}' are not numbered 0..n-1.")
  return len(ids)


def check_consumed(state_dict: dict, used: set, what: str) -> None:
  """ValueError naming the keys the conversion did not understand (nothing is dropped silently)."""
  left = sorted(set(state_dict) - used)
  if left:
    raise ValueError(f"{len(left)} {what} key(s) have no counterpart in this project's ViT: "
                     f"{left[:10]}{' ...' if len(left) > 10 else ''}. The model uses a "
                     "feature the conversion does not support (e.g. qk_norm, layer scale, "
                     "register tokens, fc_norm).")


# A rule pairs one of our flat keys with one PyTorch key; '{}' stands for a layer index.
# kind says how the array changes: 'raw' (as is), 'linear', 'conv', 'heads' (q/k/v
# kernel), 'heads_bias' (q/k/v bias), 'out' (attention out kernel).
_TO_TORCH = {
    "raw": lambda x: np.asarray(x),
    "linear": linear_to_torch,
    "conv": conv_to_torch,
    "heads": lambda k: heads_to_torch(k, np.zeros(np.shape(k)[1:]))[0],
    "heads_bias": lambda b: np.asarray(b).reshape(-1),
    "out": out_to_torch,
}


def _from_torch(kind: str, x, num_heads: int):
  if kind == "heads":
    return heads_from_torch(x, np.zeros(np.shape(x)[0]), num_heads)[0]
  if kind == "heads_bias":
    check_heads(np.size(x), num_heads)
    return np.asarray(x).reshape(num_heads, -1)
  if kind == "out":
    return out_from_torch(x, num_heads)
  return {"raw": np.asarray, "linear": linear_from_torch, "conv": conv_from_torch}[kind](x)


def _pattern(template: str):
  import re
  return re.compile("^" + re.escape(template).replace(r"\{\}", r"(\d+)") + "$")


def apply_rules(source: dict, rules, *, to_torch: bool, num_heads: int | None = None):
  """Renames and re-lays out `source` by `rules`; returns (converted, source keys used)."""
  out, used = {}, set()
  for ours, theirs, kind in rules:
    src, dst = (ours, theirs) if to_torch else (theirs, ours)
    pattern = _pattern(src)
    for key, value in source.items():
      match = pattern.match(key)
      if not match:
        continue
      new_key = dst.format(*match.groups())
      if to_torch:
        out[new_key] = np.ascontiguousarray(_TO_TORCH[kind](value))
      else:
        if num_heads is None and kind in ("heads", "heads_bias", "out"):
          raise ValueError("num_heads is needed to split attention weights into heads.")
        out[new_key] = np.ascontiguousarray(_from_torch(kind, value, num_heads))
      used.add(key)
  return out, used


def encoder_rules(layer: str, peer_names: dict) -> list:
  """Rules for our encoder blocks given the peer's per-block names (see timm.py / hf.py)."""
  ours = f"{names.TRANSFORMER}/{names.SCANNED_BLOCK}_{{}}/"
  rules = []
  for our_name, kind_w, kind_b in (
      (names.ATTENTION_NORM, "raw", "raw"), (names.MLP_NORM, "raw", "raw"),
      (names.MLP_IN, "linear", "raw"), (names.MLP_OUT, "linear", "raw"),
      (f"{names.ATTENTION}/query", "heads", "heads_bias"),
      (f"{names.ATTENTION}/key", "heads", "heads_bias"),
      (f"{names.ATTENTION}/value", "heads", "heads_bias"),
      (f"{names.ATTENTION}/{names.ATTENTION_OUT}", "out", "raw")):
    if our_name not in peer_names:
      continue
    leaf_w = "scale" if our_name in (names.ATTENTION_NORM, names.MLP_NORM) else "kernel"
    rules.append((f"{ours}{our_name}/{leaf_w}", f"{layer}{peer_names[our_name]}.weight", kind_w))
    rules.append((f"{ours}{our_name}/bias", f"{layer}{peer_names[our_name]}.bias", kind_b))
  return rules
