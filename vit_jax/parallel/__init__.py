"""Devices, meshes and shardings: one code path for 1 CPU device, 8 emulated ones, a pod."""
