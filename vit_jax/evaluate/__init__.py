"""Evaluations from the paper: few-shot linear probes and attention / position analyses."""

from vit_jax.evaluate.attention import (attention_rollout, collect_attention,
                                        mean_attention_distance, patch_distances, upsample_map)
from vit_jax.evaluate.fewshot import (LinearProbe, fewshot_accuracy, fit_linear_probe,
                                      sample_shots)
from vit_jax.evaluate.posemb import posemb_similarity

__all__ = ["LinearProbe", "attention_rollout", "collect_attention", "fewshot_accuracy",
           "fit_linear_probe", "mean_attention_distance", "patch_distances",
           "posemb_similarity", "sample_shots", "upsample_map"]
