"""Evaluation: base vs adapters over a whole prompt set (`persona-lora eval`), with a report a person can read."""
