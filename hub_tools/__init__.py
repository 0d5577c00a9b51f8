"""Moving adapter (and merged model) folders between disk and model hubs, checking what comes back, merging.

Why a package of its own: pushing and pulling are where a persona adapter meets the outside world — tokens,
networks, other people's repos and pickled files. Everything here fails with a `persona_lora.errors.HubError`
or `VerificationError` that says what went wrong and how to fix it, never with a raw client traceback.

Import from the modules (`from persona_lora.hub_tools.pull import pull`): the package itself stays import-light,
so building the CLI parser does not import huggingface_hub.

- `backends`: `backend(hub)`, the one interface over the hub clients (`hf_backend`, `ms_backend`), each with the
  one translator of its client's errors.
- `push.push_folder(folder, repo_id, ...)`: one commit with only the files that belong to the folder.
- `pull.pull(repo_id, ...)`: download + verify hashes, files and, optionally, the base model;
  `pull.local_or_pulled(spec)`: the one "local folder or hub id" resolver; `pull.list_adapters(base_id)`.
- `verify`: the checks `pull` runs, usable on any local folder (the demo uses the base-compatibility check).
- `files`: which files belong in a pushed folder, which are pickles.
- `merge` (+ `merge_checks`, `merge_math`, `merge_write`): shard-by-shard merge in the base's own layout.
- `cli`, `merge_cli`: the `push`, `pull`, `list` and `merge` subcommands.
"""
