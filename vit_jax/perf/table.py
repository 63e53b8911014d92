"""Running a list of benchmark rows and printing them as one Markdown table."""

import dataclasses

from vit_jax.perf.measure import matmul_peak_gflops
from vit_jax.perf.rows import RowSpec, measure_row, peak_fraction, row_in_subprocess

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


def run_benchmark(specs: list[RowSpec], *, rounds: int = 1, isolate: bool = True,
                  log=print) -> list[dict]:
  """Measures the matmul peak, then every row (`rounds` times, interleaved)."""
  import jax
  from vit_jax.parallel import cpu_devices
  cpu_devices.configure_cpu_devices(specs[0].devices or None if specs else None)
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
      result = (row_in_subprocess(spec, peak_cpu) if isolate
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
      r["peak_fraction"] = peak_fraction(r, peak_cpu, peak)
  add_timm_ratios(results)
  return results
