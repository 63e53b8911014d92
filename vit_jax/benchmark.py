"""Speed benchmarks: the model (default), the input pipeline, and GPU numerics.

  python -m vit_jax.benchmark --models=ViT-Ti_16,ViT-S_16 --batch=32 --compare=timm
  python -m vit_jax.benchmark data [--folder ROOT] [--crop 224] [--batch 32] [--randaugment 2,15]
  python -m vit_jax.benchmark parity      (on a GPU: attention kernels and bf16 vs float32)

Every table starts with the machine it ran on (CPU model, cores, AVX2/AVX-512/AMX).

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
import json
import os
import sys
import tempfile
import time

from vit_jax.perf import machine
from vit_jax.perf.rows import RowSpec, measure_row
from vit_jax.perf.table import format_table, run_benchmark


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


def _data_main(argv) -> None:
  """`benchmark data`: images/s of the training input pipeline (perf/pipeline.py)."""
  from vit_jax.perf import pipeline  # pylint: disable=g-import-not-at-top (grain, tfds)
  parser = argparse.ArgumentParser(prog="python -m vit_jax.benchmark data",
                                   description=_data_main.__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--folder", default=None, help="image folder (default: synthetic)")
  parser.add_argument("--num_images", type=int, default=1000)
  parser.add_argument("--crop", type=int, default=224)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--batches", type=int, default=30, help="timed batches per run")
  parser.add_argument("--workers", default="0,2", help="comma list of data_workers")
  parser.add_argument("--threads", type=int, default=2, help="grain read threads")
  parser.add_argument("--randaugment", default=None, metavar="N,M",
                      help="also time the pipeline with RandAugment (N ops, magnitude M), "
                      "e.g. 2,15")
  args = parser.parse_args(argv)
  randaugment = None
  if args.randaugment:
    try:
      num_ops, magnitude = (float(v) for v in args.randaugment.split(","))
      randaugment = (int(num_ops), magnitude)
    except ValueError:
      parser.error(f"--randaugment must be N,M (e.g. 2,15), got {args.randaugment!r}")
  print(machine.describe())
  with tempfile.TemporaryDirectory() as tmp:
    folder = args.folder
    if folder is None:
      folder = os.path.join(tmp, "synthetic")
      start = time.perf_counter()
      kb = pipeline.write_synthetic_folder(folder, args.num_images) / 1024
      print(f"Wrote {args.num_images} synthetic 500x375 JPEGs ({kb:.0f} KB each) "
            f"in {time.perf_counter() - start:.1f}s to {folder}")
    print(f"Load average {os.getloadavg()[0]:.1f}; "
          f"MALLOC_MMAP_THRESHOLD_={os.environ.get('MALLOC_MMAP_THRESHOLD_', 'unset')}")
    for workers in [int(w) for w in args.workers.split(",")]:
      for ra in [None] + ([randaugment] if randaugment else []):
        config = pipeline.pipeline_config(
            folder, os.path.join(tmp, "tfds"), batch=args.batch, workers=workers,
            threads=args.threads if workers == 0 else 1, crop=args.crop, randaugment=ra)
        rate, cpu_rate = pipeline.measure(config, args.batches)
        mode = (f"in-process, {args.threads} threads" if workers == 0
                else f"{workers} worker processes")
        extra = f" ({cpu_rate:.0f} per CPU-second)" if workers == 0 else ""
        aug = f", RandAugment{ra}" if ra else ""
        print(f"train pipeline, {args.crop}px, batch {args.batch}{aug}, {mode}: "
              f"{rate:.0f} images/s{extra}")


def main(argv=None) -> None:
  argv = sys.argv[1:] if argv is None else list(argv)
  if argv[:1] == ["data"]:
    return _data_main(argv[1:])
  if argv[:1] == ["parity"]:
    from vit_jax.perf import parity  # pylint: disable=g-import-not-at-top
    return parity.run_parity()
  args = _parse_args(argv)
  # The parent (matmul peak) and every row's process share one GPU: none may take it all.
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  if args._row:  # A child process measuring one row.
    print(json.dumps(measure_row(RowSpec(**json.loads(args._row)), args._peak or None)))
    return
  results = run_benchmark(build_specs(args), rounds=args.rounds,
                          isolate=not args.no_isolate,
                          log=lambda s: print(s, file=sys.stderr, flush=True))
  print(machine.describe())
  print(format_table(results))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=1)


def _command() -> int:
  """main() with one message, not a traceback, for a bad flag value or path."""
  from vit_jax.cli import errors as cli_errors  # pylint: disable=g-import-not-at-top
  try:
    main()
  except cli_errors.INPUT_ERRORS as e:
    cli_errors.report(e)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(_command())
