"""Classify images with a trained model.

  python -m vit_jax.predict --checkpoint=PATH [--model=NAME] [--labels=FILE] [--top_k=5]
      [--batch_size=N] [--json] IMAGE_OR_DIR...

PATH: a trainer workdir, an Orbax params directory, a .npz (with --model) or a
`python -m vit_jax.export` directory. Directories are walked for image files (.jpg, .jpeg,
.png, .webp, .bmp). Per image it prints the path and the top-k classes with their
probabilities; --json writes one JSON object per line instead:
  {"path": ..., "top_k": [{"label": ..., "index": ..., "prob": ...}, ...]}
An image that cannot be read is named on stderr and the others are still predicted; the
exit status is 1 if any input failed (or the checkpoint cannot be loaded), else 0.
"""

import argparse
import concurrent.futures
import json
import os
import sys
import time

from vit_jax.parallel import cpu_devices


def parse_args(argv):
  parser = argparse.ArgumentParser(
      prog="python -m vit_jax.predict", description=__doc__.split("\n\n")[0])
  parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR",
                      help="image files, or directories walked for image files")
  parser.add_argument("--checkpoint", required=True, help="workdir, Orbax params "
                      "directory, .npz file or export directory")
  parser.add_argument("--model", help="model name for a .npz or Orbax params, e.g. ViT-B_16")
  parser.add_argument("--labels", help="text file with one class name per line")
  parser.add_argument("--top_k", type=int, default=5, help="classes shown per image")
  parser.add_argument("--batch_size", type=int, default=32, help="images per batch")
  parser.add_argument("--json", action="store_true", help="one JSON object per line")
  args = parser.parse_args(argv)
  if args.top_k < 1:
    parser.error(f"--top_k={args.top_k} must be at least 1.")
  if args.batch_size < 1:
    parser.error(f"--batch_size={args.batch_size} must be at least 1.")
  return args


def _error(message: str) -> None:
  print(f"Error: {message}", file=sys.stderr, flush=True)


def collect_inputs(inputs):
  """(image paths in order, number of inputs that failed); failures named on stderr."""
  from vit_jax.inference import preprocess  # pylint: disable=g-import-not-at-top
  paths, failed = [], 0
  for item in inputs:
    if os.path.isdir(item):
      found = preprocess.find_images(item)
      if not found:
        _error(f"{item}: no image files in this directory (looked for "
               ".jpg, .jpeg, .png, .webp, .bmp).")
        failed += 1
      paths.extend(found)
    elif os.path.exists(item):
      paths.append(item)
    else:
      _error(f"{item}: no such file or directory.")
      failed += 1
  return paths, failed


def _read_chunk(predictor, paths):
  """[(path, resized uint8 image or None)], errors named on stderr as they are found."""
  from vit_jax.inference import preprocess  # pylint: disable=g-import-not-at-top
  out = []
  for path in paths:
    try:
      image = preprocess.read_image(path)
      out.append((path, predictor.preprocess([image])[0]))
    except ValueError as e:  # ImageReadError, or an image the resize cannot take.
      _error(str(e))
      out.append((path, None))
  return out


def _print(predictor, path, probs, top_k, as_json):
  (row,) = predictor.top_k(probs[None], top_k)
  if as_json:
    print(json.dumps({"path": path, "top_k": [
        {"label": label, "index": index, "prob": prob} for index, label, prob in row]}))
  else:
    print(f"{path}: " + ", ".join(f"{label} {prob:.4f}" for _, label, prob in row))


def predict_paths(predictor, paths, *, top_k, as_json) -> tuple:
  """Predicts `paths` in batches, reading the next batch while this one runs.

  Returns (number predicted, number that failed).
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  size = predictor.batch_size
  chunks = [paths[i:i + size] for i in range(0, len(paths), size)]
  done = failed = 0
  with concurrent.futures.ThreadPoolExecutor(max_workers=1) as reader:
    pending = reader.submit(_read_chunk, predictor, chunks[0]) if chunks else None
    for i in range(len(chunks)):
      chunk = pending.result()
      pending = reader.submit(_read_chunk, predictor, chunks[i + 1]) \
          if i + 1 < len(chunks) else None
      good = [(p, img) for p, img in chunk if img is not None]
      failed += len(chunk) - len(good)
      if not good:
        continue
      probs = predictor.predict_preprocessed(np.stack([img for _, img in good]))
      for (path, _), row in zip(good, probs):
        _print(predictor, path, row, top_k, as_json)
      sys.stdout.flush()
      done += len(good)
  return done, failed


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  cpu_devices.configure_cpu_devices()  # Before anything initialises the JAX backends.
  from vit_jax import inference  # pylint: disable=g-import-not-at-top
  from vit_jax.checkpoints import errors as ckpt_errors  # pylint: disable=g-import-not-at-top
  try:
    predictor = inference.load(args.checkpoint, model=args.model, labels=args.labels,
                               batch_size=args.batch_size)
  except (inference.LoadError, ckpt_errors.CheckpointError, ValueError, OSError) as e:
    _error(str(e))
    return 1
  for note in predictor.notes:
    print(f"Note: {note}.", file=sys.stderr)
  paths, failed = collect_inputs(args.inputs)
  start_wall, start_cpu = time.perf_counter(), time.process_time()
  done, unreadable = predict_paths(predictor, paths, top_k=args.top_k, as_json=args.json)
  wall, cpu = time.perf_counter() - start_wall, time.process_time() - start_cpu
  failed += unreadable
  print(f"{done} image(s) predicted, {failed} input(s) failed; {wall:.1f} s "
        f"({done / max(wall, 1e-9):.1f} images/s, {done / max(cpu, 1e-9):.1f} images per "
        f"CPU-second) with {predictor.model_name} ({predictor.image_size} px) from "
        f"{predictor.source}.", file=sys.stderr)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
