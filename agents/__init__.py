"""The three stages: fetch+chunk, embed, window-write. Thin: they own the I/O only."""
