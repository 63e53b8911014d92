"""One benchmark row: a model in one mode (inference or train step) and setup, measured in
its own process, for our JAX model or timm's PyTorch model of the same size."""

import dataclasses
import json
import os
import subprocess
import sys
from typing import Optional

from vit_jax.perf.measure import (compiled_stats, device_peak_gb, host_peak_gb,
                                  lowered_flops, median_seconds, timed_compile)

# timm names of the models of the same size (patch, width, depth, heads, mlp).
TIMM_NAMES = {
    "ViT-Ti_16": "vit_tiny_patch16_224",
    "ViT-S_16": "vit_small_patch16_224",
    "ViT-S_32": "vit_small_patch32_224",
    "ViT-B_8": "vit_base_patch8_224",
    "ViT-B_16": "vit_base_patch16_224",
    "ViT-B_32": "vit_base_patch32_224",
    "ViT-L_16": "vit_large_patch16_224",
    "ViT-L_32": "vit_large_patch32_224",
    "ViT-H_14": "vit_huge_patch14_224",
}
MODES = ("infer", "train")
FRAMEWORKS = ("jax", "timm")


@dataclasses.dataclass(frozen=True)
class RowSpec:
  """One measurement: a model in one mode and setup, run in one process."""
  model: str
  mode: str  # 'infer' | 'train'
  framework: str = "jax"  # 'jax' | 'timm'
  batch: int = 32
  resolution: int = 224
  dtype: str = "float32"
  devices: int = 0  # XLA CPU devices; 0 = one per core.
  scan: bool = False
  remat: str = "none"
  attention: str = "auto"  # The model's default: cuDNN on a GPU in bf16, else 'xla'.
  optimizer: str = "adam"
  num_classes: int = 1000
  warmup: int = 2
  runs: int = 5
  xla_flags: str = ""  # Extra XLA_FLAGS for this row's process.
  torch_device: str = "cpu"  # timm rows: 'cuda' when JAX runs on a GPU (set by run_benchmark).

  @property
  def label(self) -> str:
    """A short description of the setup, e.g. 'jax scan remat=nothing_saveable'."""
    if self.framework == "timm":
      return f"timm {TIMM_NAMES.get(self.model, '?')}"
    parts = ["jax"]
    if self.scan:
      parts.append("scan")
    if self.remat != "none":
      parts.append(f"remat={self.remat}")
    if self.attention != "auto":
      parts.append(f"attn={self.attention}")
    if self.dtype != "float32":
      parts.append(self.dtype)
    if self.xla_flags:
      parts.append(self.xla_flags.replace("--xla_cpu_", ""))
    return " ".join(parts)



# ---------------------------------------------------------------------------------------
# Measuring, inside the row's own process.


def _make_model(spec: RowSpec):
  from vit_jax import models
  return models.create(spec.model, num_classes=spec.num_classes, dtype=spec.dtype,
                       scan=spec.scan, remat_policy=spec.remat, attention_impl=spec.attention,
                       image_size=spec.resolution)


def _random_batch(spec: RowSpec, mesh):
  """A global batch {'image': uint8 [batch, res, res, 3], 'label': int32 [batch]}."""
  import jax
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec
  rng = np.random.default_rng(0)
  res = spec.resolution
  batch = {
      "image": rng.integers(0, 256, (spec.batch, res, res, 3), dtype=np.uint8),
      "label": rng.integers(0, spec.num_classes, (spec.batch,), dtype=np.int32),
  }
  sharding = NamedSharding(mesh, PartitionSpec(mesh.axis_names))
  return jax.device_put(batch, sharding)


def _data_mesh(devices: int):
  """A 1-D 'data' mesh over the first `devices` devices (0 = all)."""
  import jax
  import numpy as np
  from jax.sharding import Mesh
  devs = jax.devices()
  if devices > len(devs):
    raise ValueError(f"Asked for {devices} devices but JAX sees {len(devs)}; on CPU pass a "
                     "larger --devices (it sets the XLA CPU device count) or fewer.")
  return Mesh(np.array(devs[:devices or len(devs)]), ("data",))


def _jax_inference(spec: RowSpec, mesh) -> dict:
  """Compiles and times `model.apply` on a sharded uint8 batch."""
  import jax
  from jax.sharding import NamedSharding, PartitionSpec
  from vit_jax.data.images import normalize_images
  model = _make_model(spec)
  batch = _random_batch(spec, mesh)
  replicated = NamedSharding(mesh, PartitionSpec())
  init = jax.jit(lambda rng, x: model.init(rng, normalize_images(x)), out_shardings=replicated)
  params = init(jax.random.PRNGKey(0), batch["image"])["params"]
  forward = jax.jit(lambda p, x: model.apply({"params": p}, normalize_images(x)))
  compiled, compile_times = timed_compile(forward, params, batch["image"])
  seconds, cpu_seconds = median_seconds(
      lambda: compiled(params, batch["image"]).block_until_ready(),
      warmup=spec.warmup, runs=spec.runs)
  stats = compiled_stats(compiled, mesh.size)
  if spec.scan:  # XLA counts a while loop's body once: count the unrolled model instead.
    unrolled = _make_model(dataclasses.replace(spec, scan=False))
    abstract = jax.eval_shape(unrolled.init, jax.random.PRNGKey(0), batch["image"][:1])
    forward = jax.jit(lambda p, x: unrolled.apply({"params": p}, normalize_images(x)))
    stats["flops"] = lowered_flops(forward, abstract["params"], batch["image"])
  return dict(seconds=seconds, cpu_seconds=cpu_seconds, **compile_times, **stats)


def _train_config(spec: RowSpec):
  """A training config describing this row (configs/common.py with the row's fields)."""
  from configs import common
  from vit_jax import models
  config = common.get_config()
  model_config = models.get_config(spec.model)
  model_config.update(dtype=spec.dtype, scan=spec.scan, remat_policy=spec.remat,
                      attention_impl=spec.attention, image_size=spec.resolution)
  config.model = model_config
  config.update(dict(
      num_classes=spec.num_classes, batch_size=spec.batch, eval_batch_size=spec.batch,
      total_steps=1000, warmup_steps=10, optimizer=spec.optimizer, lr=1e-3,
      grad_clip_norm=1.0, accum_steps=1, mesh=[("data", -1)], fsdp=False))
  config.pp.crop = spec.resolution
  return config


def _train_parts(spec: RowSpec, mesh, abstract: bool):
  """(state, train step) of the trainer for this row; the state abstract if asked."""
  import jax
  from vit_jax.training import objectives, optim
  from vit_jax.training import state as state_lib
  model, config = _make_model(spec), _train_config(spec)
  tx, layout = optim.make_optimizer(config), state_lib.layout_options(config)
  if abstract:
    state = state_lib.abstract_train_state(model, tx, mesh, **layout)
    shardings = jax.tree_util.tree_map(lambda a: a.sharding, state)
  else:
    state, shardings = state_lib.create_train_state(model, tx, mesh,
                                                    rng=jax.random.PRNGKey(0), **layout)
  step_fn = objectives.make_train_step(objectives.get(config), config, model, mesh, shardings)
  return state, step_fn


def _jax_train(spec: RowSpec, mesh) -> dict:
  """Compiles and times the trainer's step (forward, backward, update) per call."""
  import jax
  batch = _random_batch(spec, mesh)
  state, step_fn = _train_parts(spec, mesh, abstract=False)
  compiled, compile_times = timed_compile(step_fn, state, batch)
  stats = compiled_stats(compiled, mesh.size)
  if spec.scan:  # XLA counts a while loop's body once: count the unrolled model instead.
    abstract, unrolled_step = _train_parts(dataclasses.replace(spec, scan=False), mesh,
                                           abstract=True)
    stats["flops"] = lowered_flops(unrolled_step, abstract, batch)
  holder = [state]

  def run():
    holder[0], metrics = compiled(holder[0], batch)
    jax.block_until_ready(metrics)

  seconds, cpu_seconds = median_seconds(run, warmup=spec.warmup, runs=spec.runs)
  return dict(seconds=seconds, cpu_seconds=cpu_seconds, **compile_times, **stats)


def _timm_row(spec: RowSpec) -> dict:
  """The same measurement for timm's model of the same size, in PyTorch.

  On `spec.torch_device` ('cpu' or 'cuda'); a bfloat16 row runs under autocast, so the
  weights stay float32 as ours do. PyTorch's default float32 matmuls on a GPU do not use
  TF32, XLA's do: compare float32 GPU rows with that in mind.
  """
  import contextlib
  import torch
  import timm
  if spec.model not in TIMM_NAMES:
    raise ValueError(f"No timm counterpart for {spec.model!r}; known: {sorted(TIMM_NAMES)}.")
  device = torch.device(spec.torch_device)
  torch.manual_seed(0)
  torch.set_num_threads(len(os.sched_getaffinity(0)))
  model = timm.create_model(TIMM_NAMES[spec.model], pretrained=False,
                            num_classes=spec.num_classes, img_size=spec.resolution).to(device)
  images = torch.randn(spec.batch, 3, spec.resolution, spec.resolution, device=device)
  labels = torch.randint(0, spec.num_classes, (spec.batch,), device=device)
  autocast = (torch.autocast(device.type, dtype=getattr(torch, spec.dtype))
              if spec.dtype != "float32" else contextlib.nullcontext())
  sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
  if spec.mode == "infer":
    model.eval()

    def step():
      with torch.inference_mode(), autocast:
        model(images)
  else:
    model.train()
    opt = (torch.optim.Adam(model.parameters(), lr=1e-3) if spec.optimizer == "adam"
           else torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9))

    def step():
      opt.zero_grad(set_to_none=True)
      with autocast:
        loss = torch.nn.functional.cross_entropy(model(images), labels)
      loss.backward()
      opt.step()

  def run():
    step()
    sync()

  seconds, cpu_seconds = median_seconds(run, warmup=spec.warmup, runs=spec.runs)
  result = dict(seconds=seconds, cpu_seconds=cpu_seconds)
  if device.type == "cuda":
    result["device_peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
  return result


def measure_row(spec: RowSpec, peak_gflops_per_cpu_s: Optional[float] = None) -> dict:
  """Runs one row in this process and returns its result dict (see `COLUMNS`)."""
  if spec.mode not in MODES:
    raise ValueError(f"Unknown mode {spec.mode!r}; choose one of {MODES}.")
  if spec.xla_flags and spec.xla_flags not in os.environ.get("XLA_FLAGS", ""):
    raise ValueError(f"xla_flags={spec.xla_flags!r} only take effect in a fresh process: "
                     "run the row isolated (drop --no-isolate) or export XLA_FLAGS.")
  if spec.framework == "timm":
    result = _timm_row(spec)
    result["devices"] = None  # PyTorch runs one process with a thread per core.
    result["backend"] = spec.torch_device
  elif spec.framework == "jax":
    from vit_jax.parallel import cpu_devices
    cpu_devices.configure_cpu_devices(spec.devices or None)
    mesh = _data_mesh(spec.devices)
    if spec.batch % mesh.size:
      raise ValueError(f"Batch {spec.batch} is not divisible by the {mesh.size} devices; "
                       "pick a multiple or set --devices.")
    result = (_jax_inference if spec.mode == "infer" else _jax_train)(spec, mesh)
    result["devices"] = mesh.size
    result["backend"] = mesh.devices.flat[0].platform
    if result["backend"] != "cpu":  # XLA's GPU cost analysis omits cuBLAS/cuDNN calls.
      result["flops"] = result["lowered_flops"] = None
    result["device_peak_gb"] = device_peak_gb()
  else:
    raise ValueError(f"Unknown framework {spec.framework!r}; choose one of {FRAMEWORKS}.")
  seconds = result["seconds"]
  result.update(spec=dataclasses.asdict(spec), label=spec.label,
                img_per_s=spec.batch / seconds if seconds else None,
                img_per_cpu_s=spec.batch / result["cpu_seconds"] if seconds else None,
                host_peak_gb=host_peak_gb())
  if result.get("flops"):
    result["gflop_per_img"] = result["flops"] / spec.batch / 1e9
    if peak_gflops_per_cpu_s and seconds:
      result["peak_fraction"] = peak_fraction(result, peak_gflops_per_cpu_s)
  return result


def peak_fraction(result: dict, peak_gflops_per_cpu_s: float,
                   peak_gflops: Optional[float] = None) -> float:
  """Achieved GFLOP per CPU-second over the matmul's: both steady on a shared machine.

  On an accelerator the CPU only launches work, so wall-clock GFLOP/s over the matmul's.
  """
  if result.get("backend", "cpu") != "cpu" and peak_gflops:
    return result["flops"] / result["seconds"] / 1e9 / peak_gflops
  return result["flops"] / result["cpu_seconds"] / 1e9 / peak_gflops_per_cpu_s


def row_in_subprocess(spec: RowSpec, peak_gflops_per_cpu_s: Optional[float]) -> dict:
  """`measure_row` in a fresh Python process, so its peak memory is its own."""
  cmd = [sys.executable, "-m", "vit_jax.benchmark", "--_row",
         json.dumps(dataclasses.asdict(spec)), "--_peak", str(peak_gflops_per_cpu_s or 0)]
  env = dict(os.environ)
  if spec.xla_flags:
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {spec.xla_flags}".strip()
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
  if proc.returncode:
    raise RuntimeError(f"Benchmark row {spec} failed (exit {proc.returncode}):\n"
                       f"{proc.stderr[-3000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])
