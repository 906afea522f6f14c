"""The commands that play a trained agent: ``lab eval``, ``lab watch``, ``lab export``.

Each takes a run directory, its ``checkpoints/`` folder or a checkpoint file (``agents.load_agent``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from lab.errors import UsageError


def cmd_eval(args: argparse.Namespace) -> dict[str, Any]:
    """Plays ``--episodes`` episodes (on each stage of a multi-stage preset) and summarises them;
    ``--save`` writes ``eval.json``. Several runs (or ``--table``) give the comparison table of
    ``compress.compare`` instead."""
    import envs
    from agents import load_agent
    from agents.episodes import evaluate_preset, preset_stages
    from core.files import atomic_write_json
    from lab.watch import stage_options

    runs = args.run if isinstance(args.run, list) else [args.run]
    stage = getattr(args, "stage", None)
    if stage is not None and (len(runs) > 1 or getattr(args, "table", False)):
        raise UsageError("lab eval: --stage evaluates one run; the comparison table plays every stage")
    if stage is not None and args.save:
        raise UsageError("lab eval: --save writes the whole protocol's eval.json; with --stage leave it out")
    if len(runs) > 1 or getattr(args, "table", False):
        return eval_table(args, runs)
    args.run = runs[0]
    agent = load_agent(args.run, args.device, args.stochastic, args.seed)
    config = agent.config
    overrides = {} if args.deterministic_start else envs.eval_overrides(config.env)
    if args.sticky is not None:
        if envs.resolve(config.env).kind != "mario":
            raise UsageError(f"--sticky applies to Mario presets only; this run trains {config.env!r}")
        overrides["sticky_prob"] = args.sticky
    stages = preset_stages(config.env)
    stage_options(config.env, stage, "lab eval")  # a bad --stage: one line, before any episode
    summary = evaluate_preset(agent.policy, config.env, args.episodes, args.seed, overrides, stage)
    summary = {
        "run": args.run,
        "env": config.env,
        "actions": "sampled" if args.stochastic else "greedy",
        **({"stage": stage} if stage else {}),
        **summary,
    }
    if args.save:
        path = agent.run_dir / "eval.json"
        protocol = {"checkpoint": agent.sidecar.name, "seed": args.seed, "randomised_start": overrides,
                    "date": time.strftime("%Y-%m-%d")}  # fmt: skip
        if stages:
            protocol["episodes_per_stage"] = args.episodes
        atomic_write_json(path, {**summary, **protocol})
        summary["saved"] = str(path)
    if not args.json:
        print_eval(summary)
        if args.save:
            print(f"saved: {summary['saved']}")
    return summary


def eval_table(args: argparse.Namespace, runs: list[str]) -> dict[str, Any]:
    """``lab eval RUN RUN ...``: every run measured side by side in this process (``compress.compare``)."""
    from compress.compare import compare_runs, comparison_json, format_comparison

    if args.save:
        raise UsageError("--save writes one run's eval.json; evaluate the runs one by one to save them")
    rows, protocol = compare_runs(
        runs,
        episodes=args.episodes,
        sticky_episodes=args.sticky_episodes,
        sticky_prob=0.25 if args.sticky is None else args.sticky,
        seed=args.seed,
        latency_calls=args.latency_calls,
        deterministic_start=args.deterministic_start,
        stochastic=args.stochastic,
        device=args.device,
        progress=None if args.json else print,
    )
    if not args.json:
        print(format_comparison(rows, protocol))
    return comparison_json(rows, protocol)


def print_eval(summary: dict[str, Any]) -> None:
    """The summary of ``lab eval`` on one run; clear rates with their 95% interval (Wilson)."""
    from agents.episodes import format_rate

    line = (
        f"{summary['env']}{' ' + summary['stage'] if 'stage' in summary else ''}: "
        f"{summary['episodes']} {summary.get('actions', 'greedy')} episodes, "
        f"return {summary['return_mean']:.1f} +- {summary['return_std']:.1f}, length {summary['length_mean']:.0f}"
    )
    if "clear_rate" in summary:
        line += (
            f", flag reached {format_rate(summary['clear_rate'], summary['episodes'], '95% CI ')}, "
            f"mean furthest x {summary['x_pos_mean']:.0f}"
        )
    if summary.get("stalled"):
        line += f" ({summary['stalled']} cut for making no progress)"
    print(line)
    for label, stage in summary.get("stages", {}).items():
        print(
            f"  {label}: {stage['episodes']} episode{'s' * (stage['episodes'] != 1)}, "
            f"flag reached {format_rate(stage['clear_rate'], stage['episodes'], '95% CI ')}, "
            f"mean furthest x {stage['x_pos_mean']:.0f}"
        )


def cmd_watch(args: argparse.Namespace) -> dict[str, Any]:
    """Records rollouts to a video (or shows them in a window with ``--human``: ``lab.watch``)."""
    from agents import load_agent
    from lab.watch import check_options, watch, watch_human

    if getattr(args, "explain", None):  # `lab watch --explain METHOD`: the video of `lab explain`
        from lab.explain import watch_explain

        if args.stage is not None:
            raise UsageError(
                "lab watch: --stage plays the game alone, in a video or a window; leave out --explain"
            )
        return watch_explain(args)
    check_options(args)
    if args.human:
        return watch_human(args, describe_episode)
    agent = load_agent(args.run, args.device, args.stochastic, args.seed)
    if args.out is None and not args.human:
        out = agent.run_dir / "videos" / "watch.mp4"
    else:
        out = Path(args.out) if args.out else None
    if out is not None and out.suffix.lower() not in (".mp4", ".gif"):
        raise UsageError(f"--out must end in .mp4 or .gif, got {out.name!r}")
    summary = watch(
        agent.policy,
        agent.config.env,
        out,
        args.episodes or 1,
        args.seed,
        args.human,
        args.max_steps,
        small=args.small,
        stage=args.stage,
        deterministic_start=args.deterministic_start,
    )
    if not args.json:
        for episode in summary["per_episode"]:
            print(describe_episode(episode))
        if out is not None:
            print(f"video: {out}")
    return summary


def describe_episode(episode: dict[str, Any]) -> str:
    text = f"return {episode['return']:.1f}, {episode['length']} steps"
    if "stage" in episode:
        text = f"{episode['stage']}: {text}"
    if "flag_get" in episode:
        text += (
            f", flag {'reached' if episode['flag_get'] else 'not reached'}, "
            f"distance x={episode.get('x_pos_max', 0):.0f}"
        )
        if "game_time" in episode:
            text += f", game time {episode['game_time']}"
    if episode.get("stalled"):
        text += ", cut for making no progress"
    return text


def cmd_export(args: argparse.Namespace) -> dict[str, Any]:
    """Copies a run's newest weights, config and learning curve into a small run for sharing."""
    from agents.engine import (
        CLEAR_MILESTONES,
        export_slim_checkpoint,
        first_step_reaching,
        plot_learning_curve,
    )
    from core.checkpoint import latest_checkpoint, load_checkpoint
    from core.files import atomic_write_files, check_writable
    from core.runs import run_dir_of

    source, out = run_dir_of(args.run), Path(args.out)
    if not source.is_dir() or latest_checkpoint(source / "checkpoints") is None:
        raise UsageError(f"{source} is not a run directory with a loadable checkpoint")
    if out.resolve() == source.resolve():
        raise UsageError("OUT_DIR must differ from RUN_DIR")
    if out.exists():
        check_writable(out)
    sidecar = export_slim_checkpoint(source, out)
    state, meta = load_checkpoint(sidecar)
    history = list(state.get("history", []))
    curves = [source / "metrics.json", source / "learning_curve.png"]
    if "compression" in meta and all(path.is_file() for path in curves):
        # A compressed run (lab compress) keeps its own curves: agreement, KL, the student's clears per
        # stage. The checkpoint's history holds only the PPO-style episode records behind them.
        atomic_write_files([(out / path.name, path.read_bytes()) for path in curves])
    elif history:
        plot_learning_curve(
            history,
            out / "learning_curve.png",
            f"{meta['algo'].upper()} on {meta['config']['env']}",
            state.get("evals", []),
        )
    size = sum(path.stat().st_size for path in out.rglob("*") if path.is_file())
    summary = {"run": str(out), "checkpoint": str(sidecar), "steps": int(state["global_step"]), "bytes": size}
    if any("clear_rate" in record for record in history):
        for threshold, _label, key in CLEAR_MILESTONES:
            summary[key] = first_step_reaching(history, "clear_rate", threshold)
    if not args.json:
        print(f"exported {source} at {summary['steps']:,} steps to {out} ({size / 2**20:.1f} MB)")
    return summary
