"""Head side: what the ranks say about themselves, as plain data. The status receiver,
snapshots, stack captures and the hang verdicts built on them."""
