"""The training stage: records in, an adapter folder out (PEFT files, manifest, card).

The chat format, presets, model loading and dataset reading it uses are the shared base's; here are the config,
the data preparation, the trainer (SFT) and the preference trainer (DPO/KTO) with the steps both share
(`steps`), the run folder, `reproduce/`, the `data` command (`data/`) and the embedded tiny base.
"""
