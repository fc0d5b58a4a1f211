"""Built-in passes, one per file; the file name is the registered name."""
