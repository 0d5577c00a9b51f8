"""The hub stage: pushing folders, merging adapters into their bases, exporting for serving engines, serving, and
publishing the demo as a Space.

Pulling, verifying and the hub clients are shared by every stage and live in the shared base
(`persona_lora.hubs`); this package holds the commands that only this stage runs.

- `push`: one commit with only the files that belong to the folder; `upgrade`: a legacy adapter config rewritten in
  the portable spelling; `cli`: the `push`, `pull`, `list` and `upgrade-adapter` commands;
- `merge/`, `export/`, `serve/`, `space/`: one subpackage per command, each with its own `cli`.
"""
