"""Moving adapter (and merged model) folders between disk and model hubs, and checking what comes back.

Why a package of its own: pushing and pulling are where a persona adapter meets the outside world — tokens,
networks, other people's repos and pickled files. Everything here fails with a `persona_lora.errors.HubError`
or `VerificationError` that says what went wrong and how to fix it, never with a raw client traceback.

Import from the modules (`from hub_tools.pull import pull`): the package itself stays import-light so that
building the CLI parser does not import huggingface_hub, and `hub_tools.pull` stays the module.

- `push.push_folder(folder, repo_id, ...)`: one commit with only the files that belong to the folder.
- `pull.pull(repo_id, ...)`: download (hub cache) + verify hashes, files and, optionally, the base model.
- `pull.list_adapters(base_id)`: adapters on the Hub tagged `base_model:adapter:<base_id>`.
- `verify`: the checks `pull` runs, usable on any local folder (merge uses the base-compatibility check).
- `files`: which files belong in a pushed folder, which are pickles.
- `errors`: huggingface_hub / network / ModelScope exceptions -> `HubError` with the fix.
- `modelscope_hub`: the same push/pull on ModelScope.
- `cli`: the `push`, `pull` and `list` subcommands.
"""

