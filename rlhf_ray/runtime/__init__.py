"""Ray plumbing shared by every role and driver.

- `distributed`: `DistributedWorker`, the base of each role's actor (one rank
  of a torch.distributed group).
- `actor_group`: `ActorGroup` (a role's ranks: map / scatter / gather) and
  `concat_shards`.
- `placement`: `RoleResources`, `plan_placement`, `check_fits`,
  `create_placement_group` (colocation and spread layouts).
- `deepspeed_config`: `build_deepspeed_config` (ZeRO stages, offload, dtype,
  AdamW, LR schedule).
- `checkpoint`: atomic checkpoint directories, `latest_checkpoint`,
  `prune_checkpoints`, RNG capture and restore.
- `wire`: `pack_bucket` / `unpack_bucket`, weight buckets as raw bytes
  between actors (weight sync).

Import the submodules directly; this package imports nothing so that loading
one piece does not pull in Ray or DeepSpeed.
"""
