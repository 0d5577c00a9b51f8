"""The `persona-lora data` command: check and preview datasets (training records and preference data) before a
run. Reading and validating records is the shared base's (`persona_lora.dataset`); this package holds the
command's reports.

- `cli`: `data check` (every problem, statistics, token lengths) and `data preview` (the exact training text).
"""
