"""`persona-lora merge`: an adapter merged into its base, shard by shard, in the base's own checkpoint layout.

- `run`: `merge_adapter`: check → plan → write → finalise (manifest and card of the merged folder);
- `checks`: everything refused before a byte is written (base identity, dtype, disk space, pickles);
- `deltas`: the LoRA delta of each checkpoint tensor (linear and fused-expert LoRA, per-expert layouts);
- `write`: the streaming shard writer with bounded memory;
- `cli`: the command (its options are shared with `push --merged`).
"""
