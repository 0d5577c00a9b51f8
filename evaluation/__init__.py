"""Evaluation: base vs adapters over a whole prompt set (`persona-lora eval`), with a report a person can read.

- `cli`: the command and its options; `runner.evaluate` runs it: `plan` (what runs, checked before any model
  is loaded) → `sets` (the user's data, an adapter's held-out split, the forgetting guard) → `scoring` (one base
  model with every adapter: loss on the reference answers, batched greedy answers) → `store` (rows appended as
  they finish; a rerun continues) → `judge` (optional) → `report` (`report.json`) and `html_report`
  (`report.html`).
- `metrics` and `table`: the figures and the one summary table the page and the model card show
  (`persona_lora.model_cards.eval_section` puts it into the card).
"""
