"""Shared pytest set-up: one torch thread, headless rendering."""

import os

os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
os.environ.setdefault("MPLBACKEND", "Agg")

import torch  # noqa: E402

# One thread: the small nets of the tests run 10-30x slower with two on a busy 2-core machine.
torch.set_num_threads(1)
