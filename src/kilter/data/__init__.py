"""Records, readers, converters, tokenization, collation and the built-in task."""
