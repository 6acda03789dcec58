"""lmms-eval model classes of the harness (one per model family), their prompting, and the entry-point plugin."""
