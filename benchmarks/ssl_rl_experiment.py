"""Does self-supervision or augmentation make PPO learn Mario 1-1 faster? The experiment of issue 22,
as a lab user runs it, resumably, one step at a time:

    python -m benchmarks.ssl_rl_experiment frames     # frame stacks: random play + the shipped agent
    python -m benchmarks.ssl_rl_experiment pretrain   # lab fit ssl data=mario (ATC) on those frames
    python -m benchmarks.ssl_rl_experiment train      # PPO arms x seeds at a fixed budget
    python -m benchmarks.ssl_rl_experiment report     # curves with bootstrap bands, table, sticky evals
    python -m benchmarks.ssl_rl_experiment all        # the four in turn

The arms (``--arms``), each ``lab train mario-1-1`` with the preset's hyperparameters, launched for
the preset's 2M-step learning-rate schedule (``--horizon``) and stopped at the budget (``--steps``),
as the shipped run's first steps were:

=================  ==============================================================================
baseline           the preset as it is
augment            ``--set augment=shift``: pad-4 random shifts with DrAC's regulariser
pretrained         ``--set init_encoder=RUN``: the Nature CNN starts from the ATC encoder of
                   ``pretrain``, whose frames include the shipped agent's play
pretrained-random  the same with an ATC encoder pre-trained on random play alone (``pretrain``
                   builds it when the arm is asked for; not in the default ``--arms``): no expert
                   anywhere, so it says whether the encoder's help needs the expert's frames
=================  ==============================================================================

Every run lives in ``ROOT/<arm>-s<seed>``; ``train`` skips the runs that reached the budget, resumes
the ones with a checkpoint (``lab train --resume``) and starts the rest, each as a child process at
``--nice``, so the script can be stopped and started again at any point. A run that reaches the
budget leaves a record in ``RECORDS/<arm>-s<seed>.json`` (its history and its sticky-action clear
rate, tens of KB) meant to be committed: the runs themselves are gitignored, and a lost machine lost
three finished runs once. ``report`` reads the records, and the runs without one as far as they got
(the newest checkpoint's history for unfinished ones), draws furthest x and the
training clear rate (last 100 episodes) per arm, the mean over seeds with a bootstrap 95% interval,
next to the shipped run's curve, and tabulates per seed the steps to the first clear and to 50%
training clears and the final agent's clear rate with sticky actions (p = 0.25).

Gathering frames with the shipped agent needs ``agents`` (to load it), which the task layer may not
import (ARCHITECTURE.md); this script passes the agent's greedy policy to
:func:`tasks.ssl.gather_frames` instead, and it also labels every frame with the agent's action for
the probe.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.experiments import (
    bootstrap_band,
    checkpoint_step,
    curve,
    load_record,
    parse_seeds,
    run_history,
    run_lab,
    save_record,
    set_niceness,
    steps_reached,
)

ENV = "mario-1-1"
SHIPPED = Path("runs/mario-1-1")
ROOT = Path("runs/ssl-rl")
FRAMES = Path("runs/ssl-mario-frames.npz")
ENCODER = Path("runs/ssl-mario-atc")
RANDOM_ENCODER = Path("runs/ssl-mario-atc-random")
STAGES = ("1-1", "1-2", "1-3")
# Per-env share of random actions while gathering: the agent's play, noisier and noisier, and pure
# random play; never 0, or the deterministic emulator would replay one episode again and again.
EPSILONS = (0.03, 0.1, 0.2, 0.3, 0.5, 1.0, 1.0, 1.0)
ARMS = {
    "baseline": [],
    "augment": ["augment=shift"],
    "pretrained": ["init_encoder={encoder}"],
    "pretrained-random": ["init_encoder={random_encoder}"],
}
DEFAULT_ARMS = ("baseline", "augment", "pretrained")
# Settings of every arm: no periodic greedy evals (the curves are the training episodes'), frequent
# checkpoints so that a stopped run loses little.
COMMON_SETS = ["eval_every=0", "checkpoint_every=20480", "keep_checkpoints=1"]
STICKY = 0.25
# The mario-1-1 preset's total_steps, over which the shipped run's learning rate annealed.
HORIZON = 2_000_000
RECORDS = Path("benchmarks/results/ssl-rl")


# ---------------------------------------------------------------------------------------------
# Steps of the experiment
# ---------------------------------------------------------------------------------------------


def gather(args: argparse.Namespace) -> Path:
    """Frame stacks of ``--stages``: 8 envs per stage, the shipped agent with EPSILONS random actions."""
    from agents import load_agent
    from tasks.ssl import gather_frames

    set_niceness(args.nice)
    agent = load_agent(args.agent, device="cpu")

    def greedy(obs: np.ndarray) -> np.ndarray:
        actions, _ = agent.policy.act(obs, np.zeros(len(obs), dtype=bool))
        return actions

    agent.policy.reset(len(EPSILONS))
    started = time.time()
    frame_set = gather_frames(
        args.stages, args.frame_steps, args.seed, policy=greedy, epsilons=EPSILONS, num_envs=len(EPSILONS)
    )
    frame_set.save(args.frames)
    print(
        f"{len(frame_set)} frame stacks of {', '.join(args.stages)} ({len(np.unique(frame_set.episode))} "
        f"episodes) in {time.time() - started:.0f} s -> {args.frames}",
        flush=True,
    )
    return args.frames


def pretrain(args: argparse.Namespace, encoder: Path, frames: list[str]) -> Path:
    """``lab fit ssl`` with ATC: the encoder a ``pretrained`` arm starts from. ``frames``: the
    ``--set`` items that say which frames (a frames file, or random play gathered by the run)."""
    if (encoder / "metrics.json").exists():
        print(f"{encoder} is pre-trained already", flush=True)
        return encoder
    resume = (encoder / "checkpoints").is_dir()
    command = (
        ["fit", "--resume", str(encoder)]
        if resume
        else ["fit", "ssl", "--run-dir", str(encoder), "--epochs", str(args.ssl_epochs),
              "--seed", str(args.seed), "--set", "data=mario", *(part for item in frames for part in ("--set", item)),
              # The recorded run's temperature (ATC's learnt bilinear product sets its own scale).
              "--set", "temperature=0.2"]
    )  # fmt: skip
    run_lab(command + ["--no-progress", "--json"], args.nice)
    return encoder


def train(args: argparse.Namespace) -> None:
    """Every arm and seed to ``--steps`` agent steps: skipped when there, resumed, or started.

    With ``--pause-at N`` each run stops at its first checkpoint past N agent steps (SIGTERM: it
    saves and exits), so a session with little time runs a prefix of every run under the schedule
    of the whole budget; a later call without it continues them."""
    # Every run is launched for the preset's whole schedule (``--horizon``) and stopped at the
    # budget, so its learning rate anneals as the shipped run's did and their curves compare.
    horizon = max(args.horizon, args.steps)
    stop_at = args.pause_at or args.steps
    # Only a stop short of the horizon comes from outside: a run reaching the horizon ends by
    # itself, after its final evaluation and metrics.json.
    pausing = stop_at < horizon
    for seed in args.seeds:
        for arm in args.arms:
            run_dir = args.root / f"{arm}-s{seed}"
            if record_path(args, arm, seed).exists():
                print(f"{run_dir}: done, recorded in {record_path(args, arm, seed)}", flush=True)
                continue
            reached = steps_reached(run_dir)
            if reached >= stop_at:
                print(
                    f"{run_dir}: {reached:,} steps, {'done' if reached >= args.steps else 'paused'}",
                    flush=True,
                )
                if reached >= args.steps:
                    write_record(args, arm, seed)
                continue
            if reached > 0:
                command = ["train", "--resume", str(run_dir), "--steps", str(horizon)]
            else:
                (run_dir / "config.json").unlink(missing_ok=True)  # a start that saved nothing
                encoders = {"encoder": args.encoder, "random_encoder": args.random_encoder}
                sets = [item.format(**encoders) for item in [*ARMS[arm], *COMMON_SETS]]
                command = [
                    "train",
                    ENV,
                    "--seed",
                    str(seed),
                    "--steps",
                    str(horizon),
                    "--run-dir",
                    str(run_dir),
                ]
                command += [part for item in sets for part in ("--set", item)]
            stop = (lambda d=run_dir: checkpoint_step(d) >= stop_at) if pausing else None
            run_lab(command + ["--no-progress"], args.nice, stop)
            if steps_reached(run_dir) >= args.steps:
                write_record(args, arm, seed)


def record_path(args: argparse.Namespace, arm: str, seed: int) -> Path:
    return args.records / f"{arm}-s{seed}.json"


def write_record(args: argparse.Namespace, arm: str, seed: int) -> None:
    """The finished run's history and sticky-action clear rate, in a small committed file."""
    run_dir = args.root / f"{arm}-s{seed}"
    set_niceness(args.nice)  # the evaluation runs in this process, beside other work
    sticky = (
        None if args.sticky_episodes == 0 else sticky_clear_rate(run_dir, args.sticky_episodes, seed=12345)
    )
    record = {
        "arm": arm,
        "seed": seed,
        "budget": args.steps,
        "horizon": max(args.horizon, args.steps),
        "sticky_clear_rate": sticky,
        "sticky_episodes": args.sticky_episodes,
        "history": run_history(run_dir),
    }
    save_record(record_path(args, arm, seed), record)


# ---------------------------------------------------------------------------------------------
# Reading the runs
# ---------------------------------------------------------------------------------------------


def sticky_clear_rate(run_dir: Path, episodes: int, seed: int) -> float | None:
    """Greedy clear rate of the run's newest weights with sticky actions (p = 0.25) and the
    preset's evaluation starts; None when the run has no checkpoint."""
    import envs
    from agents import load_agent
    from agents.episodes import evaluate
    from core.checkpoint import CheckpointError

    try:
        agent = load_agent(run_dir, device="cpu")
    except CheckpointError:
        return None
    overrides = {**envs.eval_overrides(ENV), "sticky_prob": STICKY}
    summary = evaluate(agent.policy, lambda n: envs.make_vec(ENV, n, seed=seed, **overrides), episodes, seed)
    return float(summary["clear_rate"])


def within_budget(record: dict[str, Any] | None, run_dir: Path, steps: int) -> list[dict[str, Any]]:
    """The run's history (from its record, else its directory) up to ``steps`` agent steps."""
    history = record["history"] if record else run_history(run_dir)
    return [entry for entry in history if entry["step"] <= steps]


def report(args: argparse.Namespace) -> dict[str, Any]:
    """The plot, the per-seed table (printed as Markdown) and a JSON record of both."""
    from agents.engine import first_step_reaching

    rng = np.random.default_rng(0)
    records = {
        (arm, seed): load_record(record_path(args, arm, seed)) for arm in args.arms for seed in args.seeds
    }
    # A run stops at its first checkpoint past the budget: its records after the budget are cut, so
    # every arm is read at the same step.
    runs = {
        arm: {
            seed: within_budget(records[arm, seed], args.root / f"{arm}-s{seed}", args.steps)
            for seed in args.seeds
        }
        for arm in args.arms
    }
    shipped = run_history(args.shipped)
    grid = np.arange(0, args.steps + 1, 4096, dtype=float)
    rows, bands = [], {}
    for arm, histories in runs.items():
        present = {seed: history for seed, history in histories.items() if history}
        for seed, history in present.items():
            record = records[arm, seed]
            if record is not None:
                sticky = record["sticky_clear_rate"]
            else:
                sticky = None if args.sticky_episodes == 0 else sticky_clear_rate(
                    args.root / f"{arm}-s{seed}", args.sticky_episodes, seed=12345
                )  # fmt: skip
            rows.append({
                "arm": arm, "seed": seed, "steps": int(history[-1]["step"]),
                "first_clear": first_step_reaching(history, "clear_rate", 1e-9),
                "clears_50": first_step_reaching(history, "clear_rate", 0.5),
                "final_clear_rate": history[-1].get("clear_rate"), "final_x": history[-1].get("x_pos_max_mean"),
                "sticky_clear_rate": sticky,
            })  # fmt: skip
        if present:
            bands[arm] = {
                key: bootstrap_band(np.stack([curve(h, key, grid) for h in present.values()]), rng)
                for key in ("x_pos_max_mean", "clear_rate")
            }
            bands[arm]["seeds"] = len(present)
    reference = {
        "first_clear": first_step_reaching(shipped, "clear_rate", 1e-9),
        "clears_50": first_step_reaching(shipped, "clear_rate", 0.5),
    }
    plot(grid, bands, {key: curve(shipped, key, grid) for key in ("x_pos_max_mean", "clear_rate")}, args)
    result = {"budget": args.steps, "rows": rows, "shipped": reference, "plot": str(args.plot),
              "date": time.strftime("%Y-%m-%d")}  # fmt: skip
    print_table(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


def plot(
    grid: np.ndarray, bands: dict[str, Any], shipped: dict[str, np.ndarray], args: argparse.Namespace
) -> None:
    from core.files import save_figure
    from core.plots import pyplot

    plt = pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), dpi=100)
    panels = (("x_pos_max_mean", "furthest x (last 100 episodes)"), ("clear_rate", "flag reached (last 100)"))
    for axis, (key, label) in zip(axes, panels, strict=True):
        axis.plot(
            grid,
            shipped[key],
            color="0.5",
            linestyle="--",
            linewidth=1,
            label="shipped run (seed 1, 2M schedule)",
        )
        for index, (arm, band) in enumerate(bands.items()):
            mean, low, high = band[key]
            color = f"C{index}"
            # Markers keep a short smoke run's few points visible.
            marker = "o" if len(grid) < 10 else None
            axis.plot(grid, mean, color=color, marker=marker, label=f"{arm} (n={band['seeds']})")
            axis.fill_between(grid, low, high, color=color, alpha=0.2, linewidth=0)
        axis.set_xlabel("agent steps")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    axes[1].set_ylim(-0.02, 1.02)
    axes[0].legend(fontsize=7, loc="upper left")
    fig.suptitle(f"PPO on {ENV}: mean over seeds, bootstrap 95% band", fontsize=10)
    fig.tight_layout()
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, args.plot)


def print_table(result: dict[str, Any]) -> None:
    def steps(value: int | None) -> str:
        return "-" if value is None else f"{value / 1000:.0f}k"

    def rate(value: float | None) -> str:
        return "-" if value is None or not math.isfinite(value) else f"{value:.2f}"

    print(f"| arm | seed | steps run | first clear | 50% clears | clear rate (last 100) | furthest x | "
          f"sticky clear rate (p={STICKY}) |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in result["rows"]:
        x = row["final_x"]
        print(
            f"| {row['arm']} | {row['seed']} | {steps(row['steps'])} | {steps(row['first_clear'])} | "
            f"{steps(row['clears_50'])} | {rate(row['final_clear_rate'])} | "
            f"{'-' if x is None or not math.isfinite(x) else f'{x:.0f}'} | {rate(row['sticky_clear_rate'])} |"
        )
    shipped = result["shipped"]
    print(
        f"shipped run: first clear {steps(shipped['first_clear'])}, 50% clears {steps(shipped['clears_50'])}"
    )


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=("frames", "pretrain", "train", "report", "all"))
    parser.add_argument(
        "--root", type=Path, default=ROOT, help=f"run directories of the arms (default {ROOT})"
    )
    parser.add_argument(
        "--records", type=Path, default=RECORDS, help=f"finished runs' records, committed (default {RECORDS})"
    )
    parser.add_argument(
        "--arms",
        default=",".join(DEFAULT_ARMS),
        help=f"comma-separated subset of {','.join(ARMS)} (default {','.join(DEFAULT_ARMS)})",
    )
    parser.add_argument("--seeds", default="1,2,3", help="comma-separated seeds (default 1,2,3)")
    parser.add_argument("--steps", type=int, default=500_000, help="agent steps per run (default 500000)")
    parser.add_argument(
        "--horizon",
        type=int,
        default=HORIZON,
        help=f"agent steps the learning rate anneals over; runs stop at --steps (default {HORIZON:,}, the preset's)",
    )
    parser.add_argument("--pause-at", type=int, default=0, help="stop each run past this many steps for now")
    parser.add_argument("--nice", type=int, default=5, help="niceness of the child processes (default 5)")
    parser.add_argument(
        "--agent", type=Path, default=SHIPPED, help=f"the expert for frames (default {SHIPPED})"
    )
    parser.add_argument("--shipped", type=Path, default=SHIPPED, help="the reference run of the plot")
    parser.add_argument("--frames", type=Path, default=FRAMES, help=f"frames file (default {FRAMES})")
    parser.add_argument("--stages", default=",".join(STAGES), help="stages played for frames")
    parser.add_argument("--frame-steps", type=int, default=500, help="vector steps of 8 envs per stage")
    parser.add_argument("--encoder", type=Path, default=ENCODER, help=f"the ATC run (default {ENCODER})")
    parser.add_argument(
        "--random-encoder",
        type=Path,
        default=RANDOM_ENCODER,
        help=f"the ATC run on random play alone, of the pretrained-random arm (default {RANDOM_ENCODER})",
    )
    parser.add_argument("--ssl-epochs", type=int, default=20, help="ATC epochs over the training frames")
    parser.add_argument("--seed", type=int, default=0, help="seed of the frames and of pre-training")
    parser.add_argument(
        "--sticky-episodes", type=int, default=20, help="sticky-action episodes per agent (0: skip)"
    )
    parser.add_argument("--plot", type=Path, default=Path("docs/images/ssl-rl-curves.png"))
    parser.add_argument("--json", type=Path, default=None, help="also write the report as JSON here")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.seeds = parse_seeds(parser, args.seeds)
    args.arms = [arm for arm in args.arms.split(",") if arm]
    unknown = [arm for arm in args.arms if arm not in ARMS]
    if unknown or not args.arms:
        parser.error(f"unknown arm {unknown[0] if unknown else ''!r}; valid arms: {', '.join(ARMS)}")
    args.stages = tuple(stage for stage in args.stages.split(",") if stage)
    # The expert's frames and their encoder serve the ``pretrained`` arm alone.
    expert_frames = "pretrained" in args.arms
    if args.step == "frames" or (args.step == "all" and expert_frames):
        if args.frames.exists():
            print(f"{args.frames} exists; delete it to gather again", flush=True)
        else:
            gather(args)
    if args.step in ("pretrain", "train", "all") and expert_frames:
        if not args.frames.exists():
            parser.error(
                f"{args.frames} does not exist; gather it first: python -m benchmarks.ssl_rl_experiment frames"
            )
        pretrain(args, args.encoder, [f"frames={args.frames}"])
    if args.step in ("pretrain", "train", "all") and "pretrained-random" in args.arms:
        # As many stacks of the same stages as the frames file holds, from random play alone.
        stages = ",".join(args.stages)
        pretrain(args, args.random_encoder, [f"random_steps={args.frame_steps}", f"stages={stages}"])
    if args.step in ("train", "all"):
        train(args)
    if args.step in ("report", "all"):
        report(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
