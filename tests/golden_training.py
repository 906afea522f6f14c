"""Golden training numbers: the first update statistics and a weights hash of short, seeded runs.

Recorded once before the run engine was split out of ppo.py and dqn.py (ARCHITECTURE.md), and
checked by tests/test_golden_training.py after every change since: the same seeds must give the
same numbers, bit for bit, on the machine type that recorded them. On another CPU (another
instruction set, so other oneDNN/BLAS kernels) only a loose tolerance is checked.

Record again (only when a change is meant to alter the numbers, and say so in the commit):

    python -m tests.golden_training --write
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
from pathlib import Path
from typing import Any

import torch

GOLDEN_FILE = Path(__file__).parent / "data" / "golden_training.json"
RECORDS = 3  # the first three logged updates of each case

# name -> the `lab train` arguments (fixed seeds, fp32 serial paths unless the case is about another).
CASES: dict[str, list[str]] = {
    "ppo-cartpole-ff": ["cartpole", "--steps", "768", "--seed", "3"],
    "ppo-cartpole-gru": ["cartpole", "--steps", "768", "--seed", "3", "--set", "memory=gru",
                         "--set", "num_minibatches=2", "--set", "shared_encoder=true"],
    "ppo-cartpole-overlap": ["cartpole", "--steps", "1024", "--seed", "3", "--set", "overlap=true"],
    "dqn-cartpole-plain": ["cartpole", "--algo", "dqn", "--steps", "1400", "--seed", "3", "--set", "n_step=1",
                           "--set", "double=false", "--set", "learning_starts=500", "--set", "log_every=300",
                           "--set", "eval_every=0", "--set", "keep_best=false"],
    "dqn-cartpole-per-nstep": ["cartpole", "--algo", "dqn", "--steps", "1400", "--seed", "3",
                               "--set", "prioritized=true", "--set", "n_step=3", "--set", "learning_starts=500",
                               "--set", "log_every=300", "--set", "eval_every=0", "--set", "keep_best=false"],
    "ppo-mario": ["mario-1-1", "--steps", "192", "--envs", "2", "--seed", "3", "--set", "num_steps=32",
                  "--set", "num_minibatches=2", "--set", "update_epochs=2", "--set", "env_backend=sync",
                  "--set", "overlap=false", "--set", "bf16=false", "--set", "eval_every=0"],
    "dqn-mario": ["mario-1-1", "--algo", "dqn", "--steps", "700", "--seed", "3", "--set", "learning_starts=200",
                  "--set", "buffer_size=1000", "--set", "log_every=150", "--set", "overlap=false",
                  "--set", "bf16=false", "--set", "eval_every=0"],
}  # fmt: skip
COMMON = ["--device", "cpu", "--no-progress", "--set", "eval_episodes=1", "--set", "checkpoint_every=100000"]
# TensorBoard tags that are functions of the seed (not of time).
STAT_TAGS = ("losses/", "charts/episodic_return", "charts/epsilon", "eval/")


def machine() -> dict[str, str]:
    """What decides the exact bits: torch's version and the CPU kernels it picks."""
    return {
        "torch": torch.__version__.split("+")[0],
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "machine": platform.machine(),
    }


def run_case(name: str, run_dir: Path) -> dict[str, Any]:
    """Trains one case into ``run_dir`` through ``lab train``; returns its golden record."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lab.cli import main

    status = main(["train", *CASES[name], *COMMON, "--run-dir", str(run_dir)])
    if status != 0:
        raise RuntimeError(f"golden case {name} exited {status}")
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    stats: dict[str, list[float]] = {}
    for tag in sorted(events.Tags()["scalars"]):
        if tag.startswith(STAT_TAGS):
            stats[tag] = [event.value for event in events.Scalars(tag)[:RECORDS]]
    return {"stats": stats, "weights_sha256": weights_hash(run_dir)}


def weights_hash(run_dir: Path) -> str:
    """SHA-256 over the newest checkpoint's model tensors, in name order."""
    from safetensors.torch import load_file

    newest = sorted((run_dir / "checkpoints").glob("*.safetensors"))[-1]
    tensors = load_file(str(newest))
    digest = hashlib.sha256()
    for key in sorted(key for key in tensors if key.startswith(("model", "q_network"))):
        digest.update(key.encode())
        digest.update(tensors[key].contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def main() -> None:
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="write tests/data/golden_training.json")
    args = parser.parse_args()
    records = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in CASES:
            records[name] = run_case(name, Path(tmp) / name)
            print(name, records[name]["weights_sha256"][:16])
    if args.write:
        GOLDEN_FILE.parent.mkdir(exist_ok=True)
        GOLDEN_FILE.write_text(json.dumps({"machine": machine(), "cases": records}, indent=1) + "\n")
        print(f"wrote {GOLDEN_FILE}")


if __name__ == "__main__":
    main()
