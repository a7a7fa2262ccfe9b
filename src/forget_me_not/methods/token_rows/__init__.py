"""token_rows: a prompt-level block that re-steers only the concept's token-embedding rows."""
