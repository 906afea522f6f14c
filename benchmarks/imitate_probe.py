"""How far does imitating a found route get before any PPO? A probe of ``--set imitate``.

For each number of passes, fits a fresh PPO network (optionally from a pre-trained encoder) to a route
file's replay exactly as ``lab train --set imitate=FILE`` does before its first rollout
(:func:`agents.ppo.imitate`), then plays greedy episodes under the target's protocol (0-30 no-ops,
the stall cut-off, with and without sticky actions 0.25) and prints the route accuracy and where the
episodes ended: what PPO starts from. A found route holds the search's detours (random held actions,
steps back), and the imitation copies them with the rest.

    python -m benchmarks.imitate_probe --route envs/routes/1-1.json --epochs 0,10,30,100 \
        --init-encoder runs/ssl-mario-atc-random
"""

from __future__ import annotations

import argparse
import time

import torch

import envs
from agents.episodes import evaluate_preset
from agents.ppo import ActorCritic, PPOConfig, PPOPolicy, config_from_dict, imitate, setup_network
from core.checkpoint import CheckpointError


def probe_config(args: argparse.Namespace, epochs: int) -> PPOConfig:
    """The preset's PPO config with the probe's route, passes and encoder, checked (ValueError)."""
    config = config_from_dict({
        **envs.resolve(args.env).ppo, "env": args.env, "seed": args.seed, "imitate": args.route,
        "imitate_epochs": epochs, "init_encoder": args.init_encoder,
    })  # fmt: skip
    config.check()
    return config


def fitted_agent(config: PPOConfig, device: torch.device) -> tuple[ActorCritic, float, float]:
    """A fresh network (with the config's encoder) fitted by :func:`imitate`: it, the route
    accuracy and the seconds the replays and the fit took."""
    torch.manual_seed(config.seed)
    probe = envs.make(config.env)
    obs_shape, num_actions = tuple(probe.observation_space.shape), int(probe.action_space.n)
    probe.close()
    agent = ActorCritic(config, obs_shape, num_actions)
    setup_network(config, agent, [agent.encoder], obs_shape, resumed=False)
    start = time.perf_counter()
    _, accuracy = imitate(agent, config, device)
    return agent, accuracy, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--env", default="mario-1-1", help="the preset (default mario-1-1)")
    parser.add_argument(
        "--route", default="envs/routes/1-1.json", help="route file(s), as imitate takes them"
    )
    parser.add_argument(
        "--epochs", default="0,10,30,100", help="comma-separated numbers of passes (0: the untrained network)"
    )
    parser.add_argument("--init-encoder", default=None, help="start the encoder from this run (init_encoder)")
    parser.add_argument("--episodes", type=int, default=10, help="greedy episodes per protocol")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    try:
        passes = [int(part) for part in args.epochs.split(",")]
    except ValueError:
        parser.exit(
            2, f"imitate_probe: --epochs {args.epochs!r}: give whole numbers separated by commas, e.g. 0,30\n"
        )
    try:
        configs = [probe_config(args, epochs) for epochs in passes]
    except ValueError as error:  # an unknown preset or a bad route file
        parser.exit(2, f"imitate_probe: {error}\n")
    torch.set_num_threads(1)
    device = torch.device("cpu")
    protocols = {"no sticky": {}, "sticky 0.25": {"sticky_prob": 0.25}}
    header = " | ".join(f"{name}: clears, mean x" for name in protocols)
    print(f"| passes | route accuracy | fit s | {header} |\n|---:|---:|---:|{'---|' * len(protocols)}")
    for config in configs:
        try:
            agent, accuracy, seconds = fitted_agent(config, device)
        except CheckpointError as error:  # nothing loadable at --init-encoder
            parser.exit(2, f"imitate_probe: {error}\n")
        cells = []
        for overrides in protocols.values():
            summary = evaluate_preset(
                PPOPolicy(agent, device), config.env, args.episodes, config.seed + 10_000,
                {**envs.eval_overrides(config.env), **overrides},
            )  # fmt: skip
            cells.append(f"{summary['clear_rate']:.0%}, {summary['x_pos_mean']:,.0f}")
        print(
            f"| {config.imitate_epochs} | {accuracy:.0%} | {seconds:.0f} | {' | '.join(cells)} |", flush=True
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
