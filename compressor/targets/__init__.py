"""Built-in targets, one per file; the file name is the registered name."""
