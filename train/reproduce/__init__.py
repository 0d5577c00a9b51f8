"""`persona-lora reproduce`: an adapter trained again from its manifest alone, and the two runs compared.

- `record`: what reproduce needs from a manifest (each missing field named) and the run's config rebuilt from it;
- `run`: base and data checked against the record, the run, the loss curves compared, the verdict;
- `cli`: the command, its per-step table and one-line verdict.
"""
