"""Generation-based evaluation (`sail-eval`): matching, pass@k, per-sample results."""
