"""Golden training numbers: the first update statistics and a weights hash of short, seeded runs.

Recorded once before the run engine was split out of ppo.py and dqn.py (ARCHITECTURE.md), and
checked by tests/test_golden_training.py after every change since: the same seeds must give the
same numbers, bit for bit, on the machine type that recorded them. On another CPU (another
instruction set, so other oneDNN/BLAS kernels) only a loose tolerance is checked.

Record again (only when a change is meant to alter the numbers, and say so in the commit):

    python -m tests.golden_training --write

The signature of the recording machine was at first torch's version, its CPU capability and the
architecture; a machine can share those and still round differently (another CPU model, AMX), so
the signature now also names the CPU model and its matrix instruction sets, and a machine type whose
bits differ gets its own record beside the first one:

    python -m tests.golden_training --add-machine

Add one only from code that reproduces the first record bit for bit on the first record's machine
type (say which commit in the commit message), and check on the new machine that this commit and
the last one known to pass give the same weights hashes (``python -m tests.golden_training`` prints
them): a seeded RL run that rounds differently can drift far from the first record (an evaluation
episode of another length, Q-values 14% apart after a few hundred prioritised n-step updates), so
the loose check cannot tell another machine's rounding from another computation in every case.

A test run compares bit for bit with the most specific record whose signature this machine matches
(every key of the record's signature equal), and loosely with the first record when none matches.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
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


#: /proc/cpuinfo flags whose presence changes which matrix kernels oneDNN and MKL pick.
KERNEL_FLAGS = ("avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16")
#: Rate and absolute tolerance of the loose check (another machine type's rounding).
LOOSE = {"rel_tol": 2e-2, "abs_tol": 2e-3}


def cpu_model() -> str:
    """``"family 6 model 167: amx_tile,avx512f,..."`` from /proc/cpuinfo (``"unknown"`` elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = sorted(set(fields.get("flags", "").split()) & set(KERNEL_FLAGS))
    return f"family {fields.get('cpu family', '?')} model {fields.get('model', '?')}: {','.join(flags)}"


def machine() -> dict[str, str]:
    """What decides the exact bits: torch's version and the CPU kernels it picks."""
    return {
        "torch": torch.__version__.split("+")[0],
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "machine": platform.machine(),
        "cpu": cpu_model(),
    }


def golden_records(golden: dict[str, Any]) -> list[dict[str, Any]]:
    """Every record of the golden file, the first one first: ``{"machine": ..., "cases": ...}``."""
    return [{"machine": golden["machine"], "cases": golden["cases"]}, *golden.get("other_machines", [])]


def matching_record(golden: dict[str, Any], signature: dict[str, str]) -> dict[str, Any] | None:
    """The most specific record whose signature ``signature`` matches (each of its keys equal), or None."""
    matches = [
        record
        for record in golden_records(golden)
        if all(signature.get(key) == value for key, value in record["machine"].items())
    ]
    return max(matches, key=lambda record: len(record["machine"]), default=None)


def loose_mismatches(got: dict[str, list[float]], expected: dict[str, list[float]]) -> list[str]:
    """The statistics of a run that the loose check finds apart from a record's (empty: the same
    computation, rounded another way)."""
    if sorted(got) != sorted(expected):
        return [f"statistics {sorted(set(got) ^ set(expected))} appeared or vanished"]
    apart = [
        f"{tag}: {len(got[tag])} values against {len(values)}"
        for tag, values in expected.items()
        if len(got[tag]) != len(values)
    ]
    return apart or [
        f"{tag}: {a} against {b}"
        for tag, values in expected.items()
        for a, b in zip(got[tag], values, strict=True)
        if not math.isclose(a, b, **LOOSE)
    ]


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
    action = parser.add_mutually_exclusive_group()
    action.add_argument(
        "--write", action="store_true", help="write tests/data/golden_training.json anew (one record)"
    )
    action.add_argument(
        "--add-machine",
        action="store_true",
        help="add (or replace) this machine type's record (see the module's docstring first)",
    )
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
    elif args.add_machine:
        golden = json.loads(GOLDEN_FILE.read_text())
        first = golden_records(golden)[0]["cases"]
        for name in CASES:  # what the loose check would say, for the commit message
            for line in loose_mismatches(records[name]["stats"], first[name]["stats"]):
                print(f"apart from the first record beyond the loose tolerance: {name}: {line}")
        signature = machine()
        others = [record for record in golden.get("other_machines", []) if record["machine"] != signature]
        golden["other_machines"] = [*others, {"machine": signature, "cases": records}]
        GOLDEN_FILE.write_text(json.dumps(golden, indent=1) + "\n")
        print(f"added this machine's record to {GOLDEN_FILE}")


if __name__ == "__main__":
    main()
