"""Evaluation: during training on the job's own Ray roles, and standalone on saved models.

- `during_training`: held-out preference metrics and reward-model accuracy of
  offline jobs, alignment accuracy with the config's judge, the online
  held-out rewards and KL, sample outputs beside the metrics; the drivers in
  `jobs/` call it with their role groups and what it reads (the config, the
  held-out data, a generate function, the tokenizer, the run folder), never
  the job itself, and it changes no model.
- `standalone`: `rlhf-ray eval`, the same measures on exported models in
  one process, without Ray.
"""
