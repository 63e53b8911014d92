"""Smoke tests of the speed benchmark on the tiny 'testing' model (1 timed run per row)."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from vit_jax import benchmark
from vit_jax.perf import machine, measure
from vit_jax.perf import table as table_lib
from vit_jax.perf import rows as rows_lib

TINY = dict(model="testing", batch=8, resolution=16, num_classes=10, warmup=1, runs=1)


def _forward_matmul_flops(tokens=17, dim=32, mlp=128, layers=2, patches=16, patch=4,
                          classes=10):
  """Multiply-adds x2 of the tiny model's matmuls for one image (elementwise ops excluded)."""
  per_layer = 2 * tokens * dim * (3 * dim + dim + 2 * mlp) + 2 * 2 * tokens * tokens * dim
  return layers * per_layer + 2 * patches * patch * patch * 3 * dim + 2 * dim * classes


@pytest.fixture(scope="module")
def results():
  specs = [rows_lib.RowSpec(mode=mode, **TINY) for mode in rows_lib.MODES]
  specs.append(rows_lib.RowSpec(mode="train", scan=True, **TINY))
  return table_lib.run_benchmark(specs, isolate=False, log=lambda s: None)


def test_table_has_every_column_and_one_row_per_spec(results):
  lines = table_lib.format_table(results).splitlines()
  header = [c.strip() for c in lines[0].strip("|").split("|")]
  assert header == [h for h, _, _ in table_lib.COLUMNS]
  assert len(lines) == 2 + len(results) == 5
  for line in lines[2:]:
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert len(cells) == len(header)
    assert cells[:6] == ["testing", cells[1], cells[2], "8", "16", "8"]
  assert [line.split("|")[3].strip() for line in lines[2:]] == ["jax", "jax", "jax scan"]


def test_numbers_are_positive_and_flops_match_the_model(results):
  infer, train, train_scan = results
  for r in results:
    assert r["img_per_s"] > 0 and r["seconds"] > 0
    assert r["img_per_cpu_s"] > 0 and r["cpu_seconds"] > 0
    assert r["compile_s"] > 0 and r["compile_cpu_s"] > 0
    assert 0 < r["peak_fraction"] < 1.5
    assert r["matmul_peak_gflops"] > 1 and r["matmul_peak_gflops_per_cpu_s"] > 1
    assert r["host_peak_gb"] > 0.1
    assert r["xla_buffers_gb"] > 0
    assert r["devices"] == 8
  matmuls = _forward_matmul_flops() / 1e9
  # XLA also counts softmax, GELU, LayerNorm and the like: a bit more than the matmuls.
  assert matmuls <= infer["gflop_per_img"] <= 1.6 * matmuls
  # Backward costs about twice the forward pass.
  assert 2.5 <= train["gflop_per_img"] / infer["gflop_per_img"] <= 4.0
  # Scan rows count the unrolled model (XLA would count the loop body once).
  assert train_scan["flops"] == pytest.approx(train["lowered_flops"], rel=1e-6)
  assert train_scan["lowered_flops"] < 0.8 * train["lowered_flops"]


def test_timm_ratio_pairs_rows_of_the_same_model_and_mode():
  def row(framework, mode, img_per_s):
    spec = rows_lib.RowSpec(model="ViT-Ti_16", mode=mode, framework=framework)
    return {"spec": json.loads(json.dumps(dataclasses.asdict(spec))),
            "img_per_s": img_per_s, "label": spec.label}
  rows = [row("jax", "infer", 60.0), row("timm", "infer", 40.0), row("jax", "train", 9.0)]
  table_lib.add_timm_ratios(rows)
  assert rows[0]["vs_timm"] == pytest.approx(1.5)
  assert "vs_timm" not in rows[2]
  table = table_lib.format_table(rows)
  assert "| 1.50x |" in table and "timm vit_tiny_patch16_224" in table


def test_peak_fraction_uses_cpu_seconds_on_cpu_and_wall_time_on_accelerators():
  row = {"flops": 100e9, "seconds": 2.0, "cpu_seconds": 4.0}
  assert rows_lib.peak_fraction({**row, "backend": "cpu"}, 50.0, 100.0) == pytest.approx(0.5)
  assert rows_lib.peak_fraction({**row, "backend": "gpu"}, 50.0, 100.0) == pytest.approx(0.5)
  assert rows_lib.peak_fraction({**row, "backend": "gpu"}, 50.0, 200.0) == pytest.approx(0.25)


def test_flops_reader_accepts_missing_cost_analyses():
  assert measure.flops_of(None) is None
  assert measure.flops_of([]) is None
  assert measure.flops_of({"bytes accessed": 1.0}) is None
  assert measure.flops_of([{"flops": 3.0}]) == 3.0


def test_model_and_benchmark_import_without_the_data_pipeline_libraries():
  """An accelerator machine with only JAX needs no grain or tensorflow-datasets."""
  code = ("import sys, vit_jax.benchmark, vit_jax.training.step, vit_jax.models; "
          "from vit_jax.data import normalize_images; "
          "print(sorted(m for m in ('grain', 'tensorflow_datasets') if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip().splitlines()[-1] == "[]"


def test_cli_runs_rows_in_subprocesses_and_writes_json(tmp_path, capsys):
  out = tmp_path / "rows.json"
  benchmark.main(["--models=testing", "--modes=infer", "--batch=8", "--resolution=16",
                  "--runs=1", "--warmup=1", f"--json={out}"])
  rows = json.loads(out.read_text())
  assert len(rows) == 1 and rows[0]["spec"]["mode"] == "infer"
  assert rows[0]["img_per_s"] > 0 and rows[0]["host_peak_gb"] > 0.1
  out = capsys.readouterr().out
  assert "| testing | infer | jax |" in out
  assert out.splitlines()[0] == machine.describe()  # Every table says where it ran.


def test_machine_line_names_the_cpu_model_cores_and_isa(tmp_path):
  cpuinfo = tmp_path / "cpuinfo"
  cpuinfo.write_text("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8481C\n"
                     "flags\t\t: fpu sse avx2 fma avx512f avx512_bf16 amx_tile amx_bf16\n"
                     "processor\t: 1\nmodel name\t: other\nflags\t\t: sse\n")
  cores = len(os.sched_getaffinity(0))
  assert machine.describe(str(cpuinfo)) == (
      f"CPU: Intel(R) Xeon(R) Platinum 8481C, {cores} cores "
      "(AVX2, FMA, AVX-512F, AVX512-BF16, AMX, AMX-BF16)")
  cpuinfo.write_text("model name\t: AMD EPYC\nflags\t\t: fpu sse avx2 fma\n")
  assert machine.describe(str(cpuinfo)) == f"CPU: AMD EPYC, {cores} cores (AVX2, FMA)"


def test_bad_input_is_explained():
  with pytest.raises(ValueError, match="Unknown mode 'eval'"):
    rows_lib.measure_row(rows_lib.RowSpec(**{**TINY, "mode": "eval"}))
  with pytest.raises(ValueError, match="not divisible by the 8 devices"):
    rows_lib.measure_row(rows_lib.RowSpec(**{**TINY, "mode": "infer", "batch": 6}))
  with pytest.raises(ValueError, match="No timm counterpart"):
    rows_lib.measure_row(rows_lib.RowSpec(**{**TINY, "mode": "infer", "framework": "timm"}))
