"""Reading persona datasets, as training, evaluation and the preference reader all need them.

- `reading`: local .json/.jsonl bytes and hub datasets into records, file-level errors (`read_json_items` is the
  one JSON/JSONL reader, also for preference records);
- `records`: normalizing and validating Alpaca, chat (`messages`) and ShareGPT records into conversations, every
  problem reported at once;
- `split`: the seeded held-out split training makes and eval rebuilds.
"""
