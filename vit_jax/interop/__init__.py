"""Weights to and from PyTorch: timm's VisionTransformer and Hugging Face's ViT.

The mappings themselves are numpy only (`vit_jax.interop.timm`, `vit_jax.interop.hf`):
state dicts are {name: np.ndarray}. torch, timm, transformers and safetensors (the
`interop` extra) are imported only by the functions that build PyTorch models or read
and write `.pth` / `.safetensors` files.
"""
