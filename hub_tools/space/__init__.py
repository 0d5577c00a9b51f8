"""`persona-lora space`: the A/B demo published as a Hugging Face Space, and what that Space runs.

Publishing (here): `spec` (the plan's types and the hardware table) → `plan` (everything checked before a file is
written) → `files` (card, requirements, our wheel) → `push` (one commit, the token as a Space secret); `cli`.
In the Space: `templates/app.py` starts `app` (the demo's page from `persona_space.json`), `gpu` (generation
inside `spaces.GPU` on ZeroGPU) and `votes` (votes pushed to a dataset by `CommitScheduler`).
"""
