"""Hubs, as every stage needs them: the clients behind one interface, verified pulls, and "folder or hub id".

Import from the modules (`from persona_lora.hubs.pull import pull`): the package itself stays import-light, so
building the CLI parser does not import huggingface_hub.

- `interface`: `HubBackend` (what we ask of a hub), its records, token redaction;
- `backends`: `backend(hub)`, the one way to a hub; `hf_backend` and `ms_backend` implement it, each with the one
  translator of its client's errors;
- `files`: which files of a folder are pushed and pulled (pickles never, unless named);
- `pull`: verified download, `local_or_pulled` (the one "folder or hub id" resolver), `list_adapters`;
- `verify`: the checks a pull runs, usable on any local folder (hashes, files, adapter ↔ base shapes).
"""
