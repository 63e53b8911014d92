"""Write a self-contained serving artifact of a trained classifier.

  python -m vit_jax.export --checkpoint=PATH --output=DIR [--model=NAME] [--labels=FILE]

PATH: a trainer workdir, an Orbax params directory or a .npz (with --model). DIR receives
model.jaxexport (`jax.export`'s serialized StableHLO: uint8 [batch, H, W, 3] at the model's
resolution in, probabilities out; symbolic batch dimension, the [-1, 1] scaling inside),
params.npz and serving.json (image size, class names, model name). `vit_jax.load(DIR)`
and `python -m vit_jax.predict --checkpoint=DIR` run it without building the Flax model.
"""

import argparse
import os
import sys

from vit_jax.parallel import cpu_devices


def parse_args(argv):
  parser = argparse.ArgumentParser(
      prog="python -m vit_jax.export", description=__doc__.split("\n\n")[0])
  parser.add_argument("--checkpoint", required=True,
                      help="workdir, Orbax params directory or .npz file")
  parser.add_argument("--output", required=True, help="directory for the artifact")
  parser.add_argument("--model", help="model name for a .npz or Orbax params, e.g. ViT-B_16")
  parser.add_argument("--labels", help="text file with one class name per line")
  return parser.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  cpu_devices.configure_cpu_devices()
  from vit_jax import inference  # pylint: disable=g-import-not-at-top
  from vit_jax.checkpoints import errors as ckpt_errors  # pylint: disable=g-import-not-at-top
  try:
    predictor = inference.load(args.checkpoint, model=args.model, labels=args.labels)
    metadata = inference.export(predictor, args.output)
  except (inference.LoadError, ckpt_errors.CheckpointError, ValueError, OSError) as e:
    print(f"Error: {e}", file=sys.stderr)
    return 1
  for note in predictor.notes:
    print(f"Note: {note}.", file=sys.stderr)
  sizes = {name: os.path.getsize(os.path.join(args.output, name)) for name in sorted(
      os.listdir(args.output))}
  print(f"Exported {metadata['model']} ({metadata['image_size']} px, "
        f"{metadata['num_classes']} classes, {metadata['output']}; platforms "
        f"{', '.join(metadata['platforms'])}) from {predictor.source} to "
        f"{os.path.abspath(args.output)}: " + ", ".join(
            f"{name} {size / 1e6:.2f} MB" for name, size in sizes.items()))
  print(f"Input: {metadata['input']}; load with vit_jax.load({args.output!r}) or "
        f"python -m vit_jax.predict --checkpoint={args.output} IMAGES")
  return 0


if __name__ == "__main__":
  sys.exit(main())
