"""Speed benchmark: inference and train-step images/s of our ViT (optionally next to timm's).

  python -m vit_jax.benchmark --models=ViT-Ti_16,ViT-S_16 --batch=32 --compare=timm

For every (model, mode) row it reports, after warm-up, the median images/s over `--runs`
timed steps (also per CPU-second of this process: steadier on a shared machine), compile
time, GFLOP per image from XLA's cost analysis (of the unrolled model for scan rows, since
XLA counts a loop body once), the fraction of a matmul peak measured in the same run (in
GFLOP per CPU-second on both sides), the peak host memory (ru_maxrss of a fresh process
per row, because maxrss only ever grows), XLA's own estimate of the step's buffers
(`compiled.memory_analysis()`) and, where the backend reports it, the peak device memory.
On a GPU the fraction is of wall-clock GFLOP/s (the CPU only launches work), the
matmul peak is measured in the rows' dtype, timm runs on the same GPU, and JAX does not
preallocate GPU memory (XLA_PYTHON_CLIENT_PREALLOCATE=false unless set), so that the
processes of the rows and of the matmul can share the device.
`--json=PATH` writes the same rows. Rows run one after another in fresh subprocesses;
with `--compare=timm` our row and timm's alternate, so both see the same machine load.
"""

import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Optional

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


def _median_seconds(fn, *, warmup: int, runs: int) -> tuple[Optional[float], Optional[float]]:
  """Median (wall, CPU) seconds of `fn()` (which must block until done) after `warmup` calls.

  CPU seconds (of all this process's threads) are much steadier than wall time on a shared
  machine. With runs=0 nothing runs and both are None (compile-only rows).
  """
  if runs == 0:
    return None, None
  for _ in range(warmup):
    fn()
  wall, cpu = [], []
  for _ in range(runs):
    start, start_cpu = time.perf_counter(), time.process_time()
    fn()
    wall.append(time.perf_counter() - start)
    cpu.append(time.process_time() - start_cpu)
  return statistics.median(wall), statistics.median(cpu)


def host_peak_gb() -> float:
  """Peak resident memory of this process so far (Linux reports ru_maxrss in KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def device_peak_gb() -> Optional[float]:
  """Largest `peak_bytes_in_use` over the local devices, or None (the CPU reports none)."""
  import jax
  peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in jax.local_devices()]
  peaks = [p for p in peaks if p is not None]
  return max(peaks) / 2**30 if peaks else None


def matmul_peak_gflops(size: int = 0, runs: int = 5,
                       dtype: str = "float32") -> tuple[float, float]:
  """(GFLOP/s, GFLOP per CPU-second) of a jitted [size, size] @ [size, size] in `dtype`.

  size 0: 2048 on the CPU, 8192 on an accelerator (a smaller product is launch-bound there).
  """
  import jax
  import jax.numpy as jnp
  size = size or (2048 if jax.default_backend() == "cpu" else 8192)
  a = jax.random.normal(jax.random.PRNGKey(0), (size, size), jnp.float32).astype(dtype)
  matmul = jax.jit(lambda x, y: x @ y)
  wall, cpu = _median_seconds(lambda: matmul(a, a).block_until_ready(), warmup=2, runs=runs)
  return 2 * size**3 / wall / 1e9, 2 * size**3 / cpu / 1e9


def _compiled_stats(compiled, num_partitions: int) -> dict:
  """FLOPs (whole program; XLA counts one partition) and buffer sizes of a compiled step."""
  flops = _flops(compiled.cost_analysis())
  mem = compiled.memory_analysis()
  stats = {"flops": flops * num_partitions if flops else None}
  if mem is not None:
    stats["xla_buffers_gb"] = num_partitions * (
        mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
        - mem.alias_size_in_bytes) / 2**30
    stats["xla_temp_gb"] = num_partitions * mem.temp_size_in_bytes / 2**30
  return stats


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


def _timed_compile(jitted, *args):
  """(compiled, stats): wall and CPU seconds of lower+compile (of which tracing and lowering
  took `lower_s`) and the FLOPs before optimisation."""
  start, start_cpu = time.perf_counter(), time.process_time()
  lowered = jitted.lower(*args)
  lower_s = time.perf_counter() - start
  compiled = lowered.compile()
  stats = {"compile_s": time.perf_counter() - start, "lower_s": lower_s,
           "compile_cpu_s": time.process_time() - start_cpu}
  stats["lowered_flops"] = _flops(lowered.cost_analysis())
  return compiled, stats


def _flops(cost) -> Optional[float]:
  """The 'flops' of a cost analysis; None where the backend gives none (e.g. lowered, GPU)."""
  if isinstance(cost, (list, tuple)):  # Older JAX: one dict per program.
    cost = cost[0] if cost else None
  return float(cost["flops"]) if cost and "flops" in cost else None


def _lowered_flops(jitted, *args) -> Optional[float]:
  """Whole-program FLOPs of the lowered (not yet partitioned or compiled) computation."""
  return _flops(jitted.lower(*args).cost_analysis())


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
  compiled, compile_times = _timed_compile(forward, params, batch["image"])
  seconds, cpu_seconds = _median_seconds(
      lambda: compiled(params, batch["image"]).block_until_ready(),
      warmup=spec.warmup, runs=spec.runs)
  stats = _compiled_stats(compiled, mesh.size)
  if spec.scan:  # XLA counts a while loop's body once: count the unrolled model instead.
    unrolled = _make_model(dataclasses.replace(spec, scan=False))
    abstract = jax.eval_shape(unrolled.init, jax.random.PRNGKey(0), batch["image"][:1])
    forward = jax.jit(lambda p, x: unrolled.apply({"params": p}, normalize_images(x)))
    stats["flops"] = _lowered_flops(forward, abstract["params"], batch["image"])
  return dict(seconds=seconds, cpu_seconds=cpu_seconds, **compile_times, **stats)


def _train_config(spec: RowSpec):
  """A training config for `vit_jax.train` describing this row (fine-tuning recipe)."""
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


def _jax_train(spec: RowSpec, mesh) -> dict:
  """Compiles and times `vit_jax.train`'s step (forward, backward, update) per call."""
  import jax
  from vit_jax import train
  model = _make_model(spec)
  batch = _random_batch(spec, mesh)
  config = _train_config(spec)
  state, shardings = train.create_train_state(config, model, mesh, rng=jax.random.PRNGKey(0))
  step_fn = train.make_train_step(config, model, mesh, shardings)
  compiled, compile_times = _timed_compile(step_fn, state, batch)
  stats = _compiled_stats(compiled, mesh.size)
  if spec.scan:  # XLA counts a while loop's body once: count the unrolled model instead.
    stats["flops"] = _unrolled_train_flops(spec, mesh, batch)
  holder = [state]

  def run():
    holder[0], metrics = compiled(holder[0], batch)
    jax.block_until_ready(metrics)

  seconds, cpu_seconds = _median_seconds(run, warmup=spec.warmup, runs=spec.runs)
  return dict(seconds=seconds, cpu_seconds=cpu_seconds, **compile_times, **stats)


def _unrolled_train_flops(spec: RowSpec, mesh, batch) -> float:
  """FLOPs of the same train step with the layers unrolled (lowered on abstract state)."""
  import jax
  from vit_jax import train
  spec = dataclasses.replace(spec, scan=False)
  model, config = _make_model(spec), _train_config(spec)
  abstract = train.abstract_train_state(config, model, mesh)
  shardings = jax.tree_util.tree_map(lambda a: a.sharding, abstract)
  return _lowered_flops(train.make_train_step(config, model, mesh, shardings), abstract, batch)


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

  seconds, cpu_seconds = _median_seconds(run, warmup=spec.warmup, runs=spec.runs)
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
    from vit_jax import platform
    platform.configure_cpu_devices(spec.devices or None)
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
      result["peak_fraction"] = _peak_fraction(result, peak_gflops_per_cpu_s)
  return result


def _peak_fraction(result: dict, peak_gflops_per_cpu_s: float,
                   peak_gflops: Optional[float] = None) -> float:
  """Achieved GFLOP per CPU-second over the matmul's: both steady on a shared machine.

  On an accelerator the CPU only launches work, so wall-clock GFLOP/s over the matmul's.
  """
  if result.get("backend", "cpu") != "cpu" and peak_gflops:
    return result["flops"] / result["seconds"] / 1e9 / peak_gflops
  return result["flops"] / result["cpu_seconds"] / 1e9 / peak_gflops_per_cpu_s


def _row_in_subprocess(spec: RowSpec, peak_gflops_per_cpu_s: Optional[float]) -> dict:
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


# ---------------------------------------------------------------------------------------
# The table.

# (header, result key, format)
COLUMNS = (
    ("model", "model", "{}"),
    ("mode", "mode", "{}"),
    ("setup", "label", "{}"),
    ("batch", "batch", "{}"),
    ("res", "resolution", "{}"),
    ("dev", "devices", "{}"),
    ("img/s", "img_per_s", "{:.2f}"),
    ("vs timm", "vs_timm", "{:.2f}x"),
    ("img/CPU-s", "img_per_cpu_s", "{:.2f}"),
    ("vs timm (CPU)", "vs_timm_cpu", "{:.2f}x"),
    ("compile s", "compile_s", "{:.1f}"),
    ("compile CPU-s", "compile_cpu_s", "{:.1f}"),
    ("GFLOP/img", "gflop_per_img", "{:.2f}"),
    ("% peak", "peak_fraction", "{:.0%}"),
    ("host peak GB", "host_peak_gb", "{:.2f}"),
    ("XLA buffers GB", "xla_buffers_gb", "{:.2f}"),
    ("device peak GB", "device_peak_gb", "{:.2f}"),
)


def _cell(result: dict, key: str, fmt: str) -> str:
  value = result.get(key, result["spec"].get(key))
  return "-" if value is None else fmt.format(value)


def format_table(results: list[dict]) -> str:
  """A Markdown table of the results, one row each, columns as in `COLUMNS`."""
  header = "| " + " | ".join(h for h, _, _ in COLUMNS) + " |"
  rule = "|" + "|".join("---" for _ in COLUMNS) + "|"
  rows = ["| " + " | ".join(_cell(r, k, f) for _, k, f in COLUMNS) + " |" for r in results]
  return "\n".join([header, rule] + rows)


def add_timm_ratios(results: list[dict]) -> None:
  """Sets `vs_timm` (our img/s over timm's) and `vs_timm_cpu` (same per CPU-second)."""
  def key(r):
    s = r["spec"]
    return (s["model"], s["mode"], s["batch"], s["resolution"])
  timm = {key(r): r for r in results
          if r["spec"]["framework"] == "timm" and r.get("img_per_s")}
  for r in results:
    other = timm.get(key(r))
    if r["spec"]["framework"] == "jax" and other and r.get("img_per_s"):
      r["vs_timm"] = r["img_per_s"] / other["img_per_s"]
      if r.get("img_per_cpu_s") and other.get("img_per_cpu_s"):
        r["vs_timm_cpu"] = r["img_per_cpu_s"] / other["img_per_cpu_s"]


def _median_of_rounds(rounds: list[list[dict]]) -> list[dict]:
  """Per row, the round with the median img/s (so every column comes from one run)."""
  merged = []
  for repeats in zip(*rounds):
    ordered = sorted(repeats, key=lambda r: r["img_per_s"] or -r.get("compile_s", 0))
    merged.append(ordered[len(ordered) // 2])
  return merged


def build_specs(args) -> list[RowSpec]:
  """The rows the flags ask for, our row and timm's interleaved."""
  specs = []
  for model in args.models.split(","):
    for mode in args.modes.split(","):
      for variant in _variants(args):
        specs.append(RowSpec(model=model, mode=mode, batch=args.batch,
                             resolution=args.resolution, dtype=args.dtype,
                             devices=args.devices, optimizer=args.optimizer,
                             warmup=args.warmup, runs=args.runs,
                             **variant))
      if args.compare == "timm":
        specs.append(RowSpec(model=model, mode=mode, framework="timm", batch=args.batch,
                             resolution=args.resolution, dtype=args.dtype,
                             optimizer=args.optimizer,
                             warmup=args.warmup, runs=args.runs))
  return specs


def _variants(args) -> list[dict]:
  """Each combination of --scan, --remat and --attention values."""
  return [dict(scan=scan, remat=remat, attention=attention, xla_flags=flags.strip())
          for scan in [s == "true" for s in args.scan.split(",")]
          for remat in args.remat.split(",")
          for attention in args.attention.split(",")
          for flags in args.xla_flags.split("|")]


def run_benchmark(specs: list[RowSpec], *, rounds: int = 1, isolate: bool = True,
                  log=print) -> list[dict]:
  """Measures the matmul peak, then every row (`rounds` times, interleaved)."""
  import jax
  from vit_jax import platform
  platform.configure_cpu_devices(specs[0].devices or None if specs else None)
  backend = jax.default_backend()
  if backend == "gpu":  # timm runs on the same accelerator.
    specs = [dataclasses.replace(s, torch_device="cuda") if s.framework == "timm" else s
             for s in specs]
  dtype = specs[0].dtype if specs and backend != "cpu" else "float32"
  peak, peak_cpu = matmul_peak_gflops(dtype=dtype)
  log(f"matmul peak (jitted {dtype} on {backend}): {peak:.1f} GFLOP/s, "
      f"{peak_cpu:.1f} per CPU-s")
  all_rounds = []
  for i in range(rounds):
    results = []
    for spec in specs:
      result = (_row_in_subprocess(spec, peak_cpu) if isolate
                else measure_row(spec, peak_cpu))
      speed = result["img_per_s"]
      log(f"round {i + 1}/{rounds} {spec.model} {spec.mode} {spec.label}: "
          + (f"{speed:.2f} img/s" if speed else f"compiled in {result['compile_s']:.1f} s"))
      results.append(result)
    all_rounds.append(results)
  results = _median_of_rounds(all_rounds)
  # The machine may be shared: take the better of the peaks measured before and after.
  peak_after, peak_cpu_after = matmul_peak_gflops(dtype=dtype)
  peak, peak_cpu = max(peak, peak_after), max(peak_cpu, peak_cpu_after)
  log(f"matmul peak, best before/after: {peak:.1f} GFLOP/s, {peak_cpu:.1f} per CPU-s")
  for r in results:
    r.update(matmul_peak_gflops=peak, matmul_peak_gflops_per_cpu_s=peak_cpu)
    if r.get("flops") and r.get("cpu_seconds"):
      r["peak_fraction"] = _peak_fraction(r, peak_cpu, peak)
  add_timm_ratios(results)
  return results


def _parse_args(argv):
  p = argparse.ArgumentParser(prog="python -m vit_jax.benchmark", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--models", default="ViT-Ti_16,ViT-S_16", help="comma-separated names")
  p.add_argument("--modes", default="infer,train", help="infer, train or both")
  p.add_argument("--batch", type=int, default=32, help="global batch size")
  p.add_argument("--resolution", type=int, default=224)
  p.add_argument("--dtype", default="float32", help="compute dtype (params stay float32)")
  p.add_argument("--devices", type=int, default=0,
                 help="XLA CPU devices to shard the batch over (0: one per core)")
  p.add_argument("--scan", default="false", help="false, true or 'false,true'")
  p.add_argument("--remat", default="none", help="comma-separated jax.checkpoint_policies")
  p.add_argument("--attention", default="auto",
                 help="comma-separated: auto,xla,dot_product,cudnn")
  p.add_argument("--optimizer", default="adam", choices=("adam", "sgd"))
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--runs", type=int, default=5,
                 help="timed steps per row (median); 0: compile only")
  p.add_argument("--rounds", type=int, default=1, help="repeat all rows; median per row")
  p.add_argument("--compare", default="", choices=("", "timm"))
  p.add_argument("--xla-flags", default="",
                 help="'|'-separated alternatives of extra XLA_FLAGS, one row each")
  p.add_argument("--json", default="", help="also write the rows to this file")
  p.add_argument("--no-isolate", action="store_true",
                 help="run rows in this process (host peak memory then only grows)")
  p.add_argument("--_row", help=argparse.SUPPRESS)
  p.add_argument("--_peak", type=float, default=0.0, help=argparse.SUPPRESS)
  return p.parse_args(argv)


def main(argv=None) -> None:
  args = _parse_args(argv)
  # The parent (matmul peak) and every row's process share one GPU: none may take it all.
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  if args._row:  # A child process measuring one row.
    print(json.dumps(measure_row(RowSpec(**json.loads(args._row)), args._peak or None)))
    return
  results = run_benchmark(build_specs(args), rounds=args.rounds,
                          isolate=not args.no_isolate,
                          log=lambda s: print(s, file=sys.stderr, flush=True))
  print(format_table(results))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  main()
