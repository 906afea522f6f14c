"""Micro-benchmarks behind the CPU levers of agents/common.py and agents/dqn.py: one Adam step by
kernel, a one-frame forward (DQN acting) and an 8-frame forward (PPO acting) in fp32, under bf16
autocast and with a bf16 forward copy (``compute.forward_copy``), and a DQN gradient step on a batch of
32 Mario frame stacks with an fp32 target network or its bf16 forward copy, and a PPO minibatch step
on 256; the gradient steps also with the uint8 frames scaled to fp32 before the network, as
``nets.layers.image_to_float`` did before it learnt to hand bf16 autocast bf16 pixels directly (the
same numbers, fewer bytes); then the one-frame forward again while a thread takes gradient steps
beside it (DQN's ``overlap``: acting competes with the learner for the caches). One torch thread, as
the agents use it. Milliseconds per call, medians of interleaved rounds.

    python -m benchmarks.learner_parts [--rounds 5] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from agents import dqn, ppo
from core import compute
from envs.registry import PRESETS

OBS_SHAPE = (4, 84, 84)
NUM_ACTIONS = 7
LEARNER_THREAD = "beside a learner: learner thread"


def milliseconds(call: Callable[[], object], repeats: int) -> float:
    """Mean time of ``call`` over ``repeats`` calls, after a few warm-up calls."""
    for _ in range(5):
        call()
    start = time.perf_counter()
    for _ in range(repeats):
        call()
    return 1000 * (time.perf_counter() - start) / repeats


def backward_and_step(
    loss: torch.Tensor, network: torch.nn.Module, optimizer: torch.optim.Optimizer, max_norm: float
) -> torch.Tensor:
    """The end of both agents' gradient steps: backward, gradient-norm clipping, optimizer step."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(network.parameters(), max_norm)
    optimizer.step()
    return loss


def build_cases() -> dict[str, Callable[[], object]]:
    config = dqn.config_from_dict({**PRESETS["mario-1-1"].dqn, "env": "mario-1-1", "dueling": False})
    q_network = dqn.QNetwork(config, OBS_SHAPE, NUM_ACTIONS)
    target_network = dqn.QNetwork(config, OBS_SHAPE, NUM_ACTIONS)
    cpu = torch.device("cpu")
    frames = {n: torch.randint(0, 256, (n, *OBS_SHAPE), dtype=torch.uint8) for n in (1, 8, 32, 256)}
    actions = torch.randint(NUM_ACTIONS, (32,))
    returns = torch.randn(32)

    cases: dict[str, Callable[[], object]] = {}
    for name, kernel in (
        ("for-loop", {"foreach": False}),
        ("foreach", {"foreach": True}),
        ("fused", {"fused": True}),
    ):
        optimizer = torch.optim.Adam(q_network.parameters(), lr=1e-9, **kernel)
        cases[f"adam step, {name}"] = lambda optimizer=optimizer: optimizer.step()

    actor = compute.forward_copy(q_network, cpu, bf16=True)  # bf16 weights where bf16 is native

    def forward(batch: int, bf16: bool, network: torch.nn.Module = q_network) -> Callable[[], object]:
        def call() -> object:
            with torch.no_grad(), compute.bf16_autocast(cpu, bf16):
                return network(frames[batch])

        return call

    for batch in (1, 8):
        cases[f"forward {batch} frame(s), fp32"] = forward(batch, False)
        cases[f"forward {batch} frame(s), bf16 autocast"] = forward(batch, True)
        cases[f"forward {batch} frame(s), bf16 copy"] = forward(batch, True, actor)

    optimizer = torch.optim.Adam(q_network.parameters(), lr=1e-9, **compute.adam_kernel(cpu))

    target_copy = compute.forward_copy(target_network, cpu, bf16=True)

    def pixels(batch: int, fp32_input: bool) -> torch.Tensor:
        """The uint8 frames, or (as image_to_float did before bf16 input) fp32 ones scaled here."""
        return frames[batch].float() / 255.0 if fp32_input else frames[batch]

    def gradient_step(
        bf16: bool, target: torch.nn.Module = target_network, fp32_input: bool = False
    ) -> Callable[[], object]:
        def call() -> object:  # DQN's learn(): target forward, online forward + backward, clip, Adam
            autocast = compute.bf16_autocast(cpu, bf16)
            with torch.no_grad(), autocast:
                target_q = returns + 0.9 * target(pixels(32, fp32_input)).float().max(dim=1).values
            with autocast:
                q_taken = q_network(pixels(32, fp32_input)).float().gather(1, actions[:, None]).squeeze(1)
            return backward_and_step(F.smooth_l1_loss(q_taken, target_q), q_network, optimizer, 10.0)

        return call

    cases["dqn gradient step (32), fp32"] = gradient_step(False)
    cases["dqn gradient step (32), bf16 autocast"] = gradient_step(True)
    cases["dqn gradient step (32), bf16 + target copy"] = gradient_step(True, target_copy)
    cases["dqn gradient step (32), bf16 + copy, fp32 input"] = gradient_step(True, target_copy, True)

    ppo_config = ppo.config_from_dict({**PRESETS["mario-1-1"].ppo, "env": "mario-1-1"})
    actor_critic = ppo.ActorCritic(ppo_config, OBS_SHAPE, NUM_ACTIONS)
    ppo_optimizer = torch.optim.Adam(actor_critic.parameters(), lr=1e-9, eps=1e-5, **compute.adam_kernel(cpu))
    ppo_actions, advantages = torch.randint(NUM_ACTIONS, (1, 256)), torch.randn(1, 256)
    old_logprobs, ppo_returns = torch.full((1, 256), -2.0), torch.randn(1, 256)
    no_starts = torch.zeros(1, 256, dtype=torch.bool)

    def ppo_minibatch_step(fp32_input: bool) -> Callable[[], object]:
        def call() -> object:  # PPO's learn() on one minibatch of 256 (T=1, N=256): clipped losses, Adam
            with compute.bf16_autocast(cpu, True):
                logits, values, _ = actor_critic(pixels(256, fp32_input)[None], None, no_starts)
            distribution = torch.distributions.Categorical(logits=logits.float())
            ratio = (distribution.log_prob(ppo_actions) - old_logprobs).exp()
            policy_loss = torch.max(-advantages * ratio, -advantages * ratio.clamp(0.9, 1.1)).mean()
            value_loss = 0.5 * ((values.float() - ppo_returns) ** 2).mean()
            loss = policy_loss - 0.01 * distribution.entropy().mean() + 0.5 * value_loss
            return backward_and_step(loss, actor_critic, ppo_optimizer, 0.5)

        return call

    cases["ppo minibatch step (256), bf16"] = ppo_minibatch_step(False)
    cases["ppo minibatch step (256), bf16, fp32 input"] = ppo_minibatch_step(True)
    cases["beside a learner: forward 1, fp32"] = forward(1, False)
    cases["beside a learner: forward 1, bf16 copy"] = forward(1, True, actor)
    cases[LEARNER_THREAD] = gradient_step(True, target_copy)  # see main()
    for parameter in q_network.parameters():  # the Adam cases step on these gradients
        parameter.grad = torch.randn_like(parameter)
    return cases


def keep_learning(step: Callable[[], object], stop: threading.Event, seconds: list[float]) -> None:
    """Takes gradient steps until ``stop`` is set, appending the duration of each to ``seconds``."""
    while not stop.is_set():
        start = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (medians are reported)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the result as JSON to PATH")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    compute.set_learner_threads(1)
    alone = build_cases()
    # The "beside a learner" cases run while a thread takes DQN gradient steps on the other core; the
    # thread's own case is not timed itself: its entry is the mean time of its steps meanwhile.
    learner_step = alone.pop(LEARNER_THREAD)
    beside = {name: alone.pop(name) for name in list(alone) if name.startswith("beside a learner")}
    samples: dict[str, list[float]] = {name: [] for name in [*alone, *beside, LEARNER_THREAD]}
    for _ in range(args.rounds):
        for name, call in alone.items():
            repeats = 5 if "(256)" in name else 20 if "step (32)" in name else 100
            samples[name].append(milliseconds(call, repeats))
        stop, steps = threading.Event(), []
        learner = threading.Thread(target=keep_learning, args=(learner_step, stop, steps))
        learner.start()
        try:
            for name, call in beside.items():
                samples[name].append(milliseconds(call, 300))
        finally:
            stop.set()
            learner.join()
        samples[LEARNER_THREAD].append(1000 * statistics.mean(steps[1:] or steps))
    result = {
        "bf16_native": compute.native_bf16(torch.device("cpu")),
        "torch": torch.__version__,
        "ms": {
            name: {"median": statistics.median(values), "samples": values} for name, values in samples.items()
        },
    }
    for name, entry in result["ms"].items():
        print(f"{name:<44}{entry['median']:8.2f} ms   " + ", ".join(f"{v:.2f}" for v in entry["samples"]))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
