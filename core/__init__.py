"""The shared core below agents/ and tasks/: run files, checkpoints, the config schema, devices and
seeds, learning-curve plots. It imports nothing of the lab above it (ARCHITECTURE.md)."""
