"""The run: its loop, its checkpoints and its lifecycle (init, signals, resume, exit)."""
