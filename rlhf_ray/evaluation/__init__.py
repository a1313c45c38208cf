"""Evaluation: during training on the job's own Ray roles, and standalone on saved models.

- `during_training`: held-out preference metrics and reward-model accuracy of
  offline jobs, alignment accuracy with the config's judge, the online
  held-out rewards and KL, sample outputs beside the metrics; it drives the
  job's role groups and is called by the drivers in `jobs/`.
- `standalone`: `rlhf-ray eval`, the same measures on exported models in
  one process, without Ray.
"""
