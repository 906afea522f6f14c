"""Errors of the core and the engine that ``lab`` turns into one line and an exit status, in a module
that imports nothing, so that the command line can catch them without loading torch (``lab --help``
stays fast). ``envs.vector.EnvWorkerError`` stays with the envs, which import nothing of the core."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint or run directory that cannot be loaded: missing, truncated, tampered or foreign."""


class TrainingStopped(RuntimeError):
    """Training cannot go on (persistent NaNs, env workers that keep failing); the message says why."""
