"""Commands that orchestrate the others: demo, label, bon, score (the CLI itself is kilter.cli)."""
