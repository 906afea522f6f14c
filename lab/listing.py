"""``lab list``: the presets, tasks and nets there are."""

from __future__ import annotations

import argparse


def cmd_list(args: argparse.Namespace) -> None:
    sections = ["envs", "tasks", "nets"] if args.what == "all" else [args.what]
    for section in sections:
        if section == "envs":
            import envs

            print("environment presets (any registered Gymnasium id with discrete actions works too):")
            for name in envs.names():
                print(f"  {name:<24} {envs.get_preset(name).description}")
        elif section == "tasks":
            import tasks

            print("supervised tasks (lab fit TASK):")
            for name in tasks.names():
                spec = tasks.get(name)
                print(f"  {name:<24} {spec.description} [nets: {', '.join(spec.nets)}]")
        else:
            import nets

            print("networks (--net NAME):")
            for name in nets.names():
                print(f"  {name:<24} {nets.describe(name)}")
