"""Prepare a dataset as ArrayRecord files for training.

  python -m vit_jax.prepare NAME|FOLDER --data_dir DIR [--manual_dir DIR] [--overwrite]
                           [--skip_corrupt]

NAME is 'digits' (embedded, no download) or a tfds dataset name ('cifar10',
'oxford_iiit_pet', 'imagenet2012' with --manual_dir, ...): it is downloaded
(or read from --manual_dir) and written by tfds with file_format=array_record.
FOLDER is an image folder ROOT/{train,test}/<class>/*.{jpg,png,...}: its files
are copied (still encoded) into ArrayRecord; training on FOLDER then reads the
prepared copy from data_dir. tfds shows progress bars while writing.
Every image is decoded once while preparing; all undecodable files are reported
together (with their paths) and nothing is trained on, unless --skip_corrupt: then
a folder's bad files are left out, and a tfds dataset's are counted (train it with
--config.pp.skip_corrupt=True).
"""

import argparse
import sys

from vit_jax.cli import errors as cli_errors
from vit_jax.data.errors import DataError
from vit_jax.data.preparation import prepare


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m vit_jax.prepare", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("name", help="tfds name ('digits', 'cifar10', ...) or image folder")
  parser.add_argument("--data_dir", default=None,
                      help="tfds data dir (default $TFDS_DATA_DIR or ~/tensorflow_datasets)")
  parser.add_argument("--manual_dir", default=None,
                      help="folder with manually downloaded files (e.g. imagenet2012)")
  parser.add_argument("--overwrite", action="store_true",
                      help="re-generate even if already prepared")
  parser.add_argument("--skip_corrupt", action="store_true",
                      help="leave out (folders) or count (tfds) undecodable images "
                      "instead of stopping with the list of them")
  parser.add_argument("--verbosity", type=int, default=0,
                      help="1: print the traceback of an error too")
  args = parser.parse_args(argv)
  try:
    path = prepare(args.name, args.data_dir, args.manual_dir, args.overwrite,
                   args.skip_corrupt)
  except (DataError,) + cli_errors.INPUT_ERRORS as e:
    cli_errors.report(e, argv)
    return 2
  print(f"Prepared {args.name} as ArrayRecord in {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
