"""The instance file store: Part 10 files written atomically, named by the store."""
