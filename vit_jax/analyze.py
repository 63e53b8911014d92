"""Analyse a trained model: attention maps, attention distance, position embeddings, few-shot.

  python -m vit_jax.analyze --workdir=WORKDIR [--out=DIR] [--num_images=6]

WORKDIR is a trainer workdir (its `config.json` and final `params/`). Writes
`attention_maps.png`, `attention_distance.png`, `posemb_similarity.png` (learned 1-D
embeddings only), `embedding_filters.png` (principal components of the patch-embedding
filters, plain ViTs only) and `analysis.json` with the numbers, including few-shot
linear-probe accuracies on frozen pre-logits features and the filters' explained-variance
ratios, to WORKDIR/analysis (or --out).
"""

from absl import app, flags
import numpy as np

from vit_jax.cli import errors as cli_errors
from vit_jax.evaluate import analysis
from vit_jax.training import workdir as workdir_lib

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A trainer workdir (config.json + params/).")
flags.DEFINE_string("out", None, "Output folder (default: WORKDIR/analysis).")
flags.DEFINE_integer("num_images", 6, "Images for the attention maps.")
flags.DEFINE_list("shots", ["1", "5", "10"], "Few-shot sizes (examples per class).")
flags.DEFINE_integer("fewshot_examples", 2000, "Train examples to draw the shots from.")


def main(argv):
  del argv
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required.")
  out = FLAGS.out or workdir_lib.file(FLAGS.workdir, workdir_lib.ANALYSIS_DIR)
  try:
    result = analysis.analyse(FLAGS.workdir, out, FLAGS.num_images,
                              [int(s) for s in FLAGS.shots], FLAGS.fewshot_examples)
  except cli_errors.INPUT_ERRORS as e:  # Not a workdir, no params/, data not prepared.
    cli_errors.report(e)
    return 1
  for name, accuracy in result["fewshot"].items():
    print(f"few-shot {name}: {accuracy}")
  print("mean attention distance per layer (px):",
        " ".join(f"{d:.1f}" for d in np.mean(result["attention_distance"], axis=1)))
  if "embedding_filters" in result:
    ratio = result["embedding_filters"]["explained_variance_ratio"]
    print(f"embedding filters: the first {min(5, len(ratio))} of {len(ratio)} principal "
          "components explain", " ".join(f"{r:.3f}" for r in ratio[:5]))
  print("plots:", *result["plots"], sep="\n  ")


if __name__ == "__main__":
  app.run(main)
