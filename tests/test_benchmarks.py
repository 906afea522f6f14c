"""benchmarks/train_throughput.py: the parent's machinery (child processes, memory sampling,
medians, ratios) on the one system that is fast enough for the suite; the training children
themselves are exercised by `lab bench train` (benchmarks/RESULTS.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import envs
from benchmarks import train_throughput
from lab.cli import main

ROOT = Path(__file__).resolve().parents[1]


def settings(**overrides):
    parser = train_throughput.build_parser()
    args = parser.parse_args([f"--{key.replace('_', '-')}={value}" for key, value in overrides.items()])
    return train_throughput.settings_from_args(args)


def test_a_child_is_timed_and_its_memory_sampled():
    systems, values = settings(systems="digits-plain", digits_epochs=1, device="cpu")
    result = train_throughput.run(systems, values, repeats=2)
    entry = result["rates"]["digits-plain"]
    assert len(entry["samples"]) == 2 and all(rate > 0 for rate in entry["samples"])
    assert entry["median"] == pytest.approx(sum(entry["samples"]) / 2, rel=1e-3)  # median of two: their mean
    # A torch process holds well over 50 MB and far less than the machine (PSS, not double-counted).
    assert 50 < entry["peak_pss_mb"] < 8_000
    assert result["settings"]["device"] == "cpu" and result["repeats"] == 2


def test_descendants_include_grandchildren():
    child = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                              "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)']); "
                              "print(p.pid, flush=True); time.sleep(30)"], stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        grandchild = int(child.stdout.readline())
        found = train_throughput.descendants(child.pid)
        assert child.pid in found and grandchild in found and os.getpid() not in found
        assert train_throughput._pss_mb(found) > 0
    finally:
        subprocess.run(["pkill", "-P", str(child.pid)], check=False)
        child.kill()
        child.wait()


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"systems": "nope"}, "unknown system 'nope'"),
        ({"systems": ","}, "no systems"),
        ({"dqn_steps": 1500}, "multiple of --learning-starts"),
        ({"envs": 3, "steps": 5}, "multiple of --minibatch"),
        ({"updates": 1}, "at least 2"),
        ({"device": "tpu"}, "auto, cpu or cuda"),
    ],
)
def test_bad_settings_are_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        settings(**overrides)


def test_lab_bench_train_refuses_an_unknown_system_in_one_line(capsys):
    assert main(["bench", "train", "--systems", "ppo-ours,nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown system 'nope'" in err and "ppo-sb3" in err and len(err.splitlines()) == 1


def fake_measure(name, values):
    """digits-plain 'runs' at 10 images/s; every other system's child fails."""
    if name != "digits-plain":
        raise RuntimeError(f"benchmark child {name} failed with exit status 1")
    return {"steps": 10, "seconds": 1.0, "cuda_peak_mb": None, "peak_pss_mb": 100.0, "rate": 10.0}


def test_a_failing_child_is_reported_and_the_other_systems_still_run(monkeypatch, capsys):
    monkeypatch.setattr(train_throughput, "measure", fake_measure)
    systems, values = settings(systems="dqn-ours,digits-plain", device="cpu")
    result = train_throughput.run(systems, values, repeats=2)
    assert result["rates"]["digits-plain"]["samples"] == [10.0, 10.0]
    assert "dqn-ours" not in result["rates"] and len(result["failures"]["dqn-ours"]) == 2
    train_throughput.print_report(result)
    assert "dqn-ours                FAILED in 2 of 2 repeats" in capsys.readouterr().out


def test_lab_bench_train_exits_1_with_one_line_when_a_child_fails_and_keeps_the_json(monkeypatch, capsys):
    monkeypatch.setattr(train_throughput, "measure", fake_measure)
    assert main(["bench", "train", "--systems", "dqn-ours,digits-plain", "--repeats", "1", "--json"]) == 1
    captured = capsys.readouterr()
    printed = json.loads(captured.out.strip().splitlines()[-1])
    assert printed["rates"]["digits-plain"]["median"] == 10.0 and list(printed["failures"]) == ["dqn-ours"]
    last_line = captured.err.strip().splitlines()[-1]
    assert last_line.startswith("lab: benchmark systems failed: dqn-ours") and "Traceback" not in captured.err


def test_learner_parts_times_every_case_and_writes_json(tmp_path, capsys):
    from benchmarks import learner_parts

    path = tmp_path / "parts.json"
    assert learner_parts.main(["--rounds", "1", "--json", str(path)]) == 0
    result = json.loads(path.read_text())
    assert set(result["ms"]) == set(learner_parts.build_cases())
    assert all(entry["median"] > 0 and len(entry["samples"]) == 1 for entry in result["ms"].values())
    out = capsys.readouterr().out
    assert "adam step, fused" in out and "beside a learner: learner thread" in out
    with pytest.raises(SystemExit) as exit_info:
        learner_parts.main(["--rounds", "0"])
    assert exit_info.value.code == 2


def test_ratios_are_reported_per_repeat_too_and_pair_only_repeats_where_both_ran(monkeypatch, capsys):
    rates = {"dqn-ours-overlap": [10.0, 40.0, 30.0, 50.0], "dqn-sb3": [5.0, 20.0, 10.0, None]}
    calls = {name: 0 for name in rates}

    def measure(name, values):
        rate = rates[name][calls[name]]
        calls[name] += 1
        if rate is None:
            raise RuntimeError(f"benchmark child {name} failed with exit status 1")
        return {"steps": 1, "seconds": 1.0, "cuda_peak_mb": None, "peak_pss_mb": 1.0, "rate": rate}

    monkeypatch.setattr(train_throughput, "measure", measure)
    systems, values = settings(systems="dqn-ours-overlap,dqn-sb3", device="cpu")
    result = train_throughput.run(systems, values, repeats=4)
    assert result["ratios"]["dqn-ours-overlap/dqn-sb3"] == 35.0 / 10.0  # the ratio of the medians
    paired = result["paired_ratios"]["dqn-ours-overlap/dqn-sb3"]
    assert paired == {"median": 2.0, "per_repeat": [2.0, 2.0, 3.0]}  # repeat 4 has no dqn-sb3 sample
    train_throughput.print_report(result)
    assert "per repeat 2.00, 2.00, 3.00 (median 2.000)" in capsys.readouterr().out
    # Never in the same repeat: a ratio of medians, but no per-repeat ratio (and no crash).
    rates.update({"dqn-ours-overlap": [None, 40.0], "dqn-sb3": [5.0, None]})
    calls.update({name: 0 for name in rates})
    result = train_throughput.run(systems, values, repeats=2)
    assert result["ratios"]["dqn-ours-overlap/dqn-sb3"] == 8.0 and result["paired_ratios"] == {}


def test_the_default_run_reports_every_targeted_ratio_with_its_verdict(monkeypatch, capsys):
    # Each default system at a fixed rate; the children themselves are not run.
    def measure(name, values):
        return {"steps": 1, "seconds": 1.0, "cuda_peak_mb": None, "peak_pss_mb": 1.0, "rate": 100.0}

    monkeypatch.setattr(train_throughput, "measure", measure)
    systems, values = settings(device="cpu")
    assert systems == train_throughput.DEFAULT_SYSTEMS
    assert set(systems) < set(train_throughput.ALL_SYSTEMS)
    result = train_throughput.run(systems, values, repeats=1)
    targeted = {name for name, target in train_throughput.TARGETS.items() if target is not None}
    assert targeted and targeted <= set(result["ratios"])  # a target on a ratio the default never computes
    train_throughput.print_report(result)
    out = capsys.readouterr().out
    for name in targeted:
        assert any(line.startswith(name) and "MISSED" in line for line in out.splitlines())


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (
            ["/x/benchmarks/train_throughput.py", "--repeats", "2"],
            "python -m benchmarks.train_throughput --repeats 2",
        ),
        (["/x/.venv/bin/lab", "bench", "train", "--systems", "a b"], "lab bench train --systems 'a b'"),
    ],
)
def test_the_recorded_command_is_the_one_that_was_typed(monkeypatch, argv, expected):
    from benchmarks.env_throughput import command_line

    monkeypatch.setattr(sys, "argv", argv)
    assert command_line("benchmarks.train_throughput") == expected


# ---- benchmarks/cpu_accounting.py -------------------------------------------------------------


def test_cpu_accounting_splits_the_window_by_role():
    from benchmarks import cpu_accounting

    root, worker = 100, 200

    def sample(at, main, other, work):  # (process total, main thread) per process
        return (at, {root: (main + other, main), worker: (work, work)})

    samples = [sample(0, 0, 0, 0), sample(10, 1, 5, 8), sample(20, 2, 9, 17), sample(30, 9, 9, 17)]
    # Skip the first 5 s and the last 5 s: from the sample at 10 s to the one at 20 s.
    accounted = cpu_accounting.account(samples, root, skip=5, tail=5)
    assert accounted["window_seconds"] == 10
    assert accounted["cpu_seconds"] == {"main thread": 1.0, "other threads": 4.0, "worker processes": 9.0}
    with pytest.raises(ValueError, match="too short"):
        cpu_accounting.account(samples, root, skip=25, tail=10)


def test_cpu_accounting_counts_threads_that_have_ended(capsys):
    import threading

    from benchmarks import cpu_accounting

    before = cpu_accounting.process_cpu_seconds(os.getpid())[os.getpid()]
    worker = threading.Thread(target=lambda: sum(i * i for i in range(2_000_000)))
    worker.start()
    worker.join()  # its CPU time now lives only in the process's total
    total, main = cpu_accounting.process_cpu_seconds(os.getpid())[os.getpid()]
    assert (total - main) - (before[0] - before[1]) > 0.02
    with pytest.raises(SystemExit) as stop:
        cpu_accounting.main(["--systems", "ppo-bogus"])
    assert stop.value.code == 2
    assert "unknown system 'ppo-bogus'" in capsys.readouterr().err


def test_the_jump_probe_finds_the_jump_that_a_route_lacks():
    # Walking right into 1-1's first goomba dies before x 300; a jump from its last steps passes it.
    from benchmarks.mario_jump_probe import RIGHT, try_jumps

    route = [RIGHT] * 40
    jumps = try_jumps("mario-1-1", route, len(route) - 2, holds=(4,), afters=(RIGHT,))
    assert [jump.takeoff_step for jump in jumps] in ([38, 39], [39, 38]) and jumps[0].furthest_x > 400


def test_the_route_search_writes_a_route_that_replays_to_where_it_says(tmp_path):
    from benchmarks import mario_route_search
    from envs.mario import load_routes

    # 40 tries start from snapshots of cells several explorations deep; a snapshot that did not
    # restore the emulator exactly would end the replay below somewhere else.
    route, furthest_x, cleared = mario_route_search.search("mario-1-1", iterations=40, seed=0)
    assert furthest_x > 400 and not cleared
    env = mario_route_search.make_search_env("mario-1-1")
    env.reset(seed=123)  # any seed: the emulator is deterministic
    for action in route:
        _, _, terminated, truncated, info = env.step(action)
        assert not (terminated or truncated)
    assert info["x_pos"] == furthest_x
    env.close()
    out = tmp_path / "routes" / "1-1.json"
    code = subprocess.run(
        [sys.executable, "-m", "benchmarks.mario_route_search", "mario-1-1", "--out", str(out), "--iterations", "2"],
        capture_output=True, text=True, cwd=ROOT,
    ).returncode  # fmt: skip
    assert code == 0 and list(load_routes(str(out))) == ["1-1"]


def test_shortening_cuts_a_detour_and_the_route_still_gets_as_far(tmp_path):
    from benchmarks import mario_route_search

    route = [0] + [3] * 10 + [6] * 8 + [3] * 12  # right+B, a step back to the left, right+B again
    env = mario_route_search.make_search_env("mario-1-1")

    def end_x(actions):
        env.reset(seed=0)
        for action in actions:
            _, _, terminated, truncated, info = env.step(action)
            assert not (terminated or truncated)
        return int(info["x_pos"])

    try:
        short = mario_route_search.shorten("mario-1-1", route)
        assert len(short) <= len(route) - 8 and short.count(6) < 8
        assert end_x(short) >= end_x(route)
    finally:
        env.close()
    file = tmp_path / "detour.json"
    file.write_text(json.dumps({"actions": "simple", "routes": {"1-1": route}}))
    out = tmp_path / "short.json"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.mario_route_search", "mario-1-1", "--route", str(file), "--shorten", "--out", str(out)],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (
        json.loads(out.read_text())["routes"]["1-1"] == short
        and f"(shortened from {len(route)})" in done.stdout
    )


def test_the_imitate_probe_fits_and_plays_each_number_of_passes(tmp_path):
    route = tmp_path / "walk.json"
    route.write_text(json.dumps({"actions": "simple", "routes": {"1-1": [3] * 20}}))
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.imitate_probe", "--route", str(route), "--epochs", "1,2", "--episodes", "1"],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    rows = [line for line in done.stdout.splitlines() if line.startswith("| 1 |") or line.startswith("| 2 |")]
    assert done.returncode == 0 and len(rows) == 2, done.stderr
    assert all(row.count("%") == 3 for row in rows)  # the accuracy and each protocol's clear rate


def test_greedy_failures_reports_the_shipped_agents_greedy_clear():
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.greedy_failures", "runs/mario-1-1", "--episodes", "1", "--sticky", "0",
         "--json"],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.splitlines()[-1])
    assert (summary["flags"], summary["deaths"], summary["timeouts"], summary["stalls"]) == (1, 0, 0, 0)
    assert summary["per_episode"][0]["outcome"] == "flag" and summary["per_episode"][0]["x_pos"] > 3000


def test_greedy_failures_writes_the_last_screen_of_each_failure(tmp_path, capsys):
    import imageio.v3 as iio

    from benchmarks import greedy_failures

    # Sticky actions at 0.9 make the shipped 1-1 agent fail early (these seeds: deaths and stalls).
    argv = [str(ROOT / "runs" / "mario-1-1"), "--episodes", "3", "--sticky", "0.9", "--seed", "1",
            "--frames", str(tmp_path), "--json"]  # fmt: skip
    assert greedy_failures.main(argv) == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])
    expected = {
        f"mario-1-1-seed{1 + index}-{episode['outcome']}-x{episode['x_pos']}.png"
        for index, episode in enumerate(summary["per_episode"])
        if episode["outcome"] != "flag"
    }
    assert expected and {path.name for path in tmp_path.iterdir()} == expected
    assert all(iio.imread(tmp_path / name).shape == (240, 256, 3) for name in expected)


def test_a_stall_with_a_held_is_reported_as_such():
    """A policy that always chooses "A" jumps once and then stands holding A: no new press, no jump."""
    from benchmarks import greedy_failures

    class AlwaysA:
        class policy:  # noqa: N801  (the attribute the probe calls, as on a loaded agent)
            @staticmethod
            def reset(count: int) -> None:
                pass

            @staticmethod
            def act(obs: np.ndarray, first: np.ndarray) -> tuple[np.ndarray, None]:
                return np.array([5]), None  # "A" in the simple set

    env = envs.make("mario-1-1", stall_patience=50)
    result = greedy_failures.play(AlwaysA, env, seed=0, action_names=env.get_wrapper_attr("action_names"))
    env.close()
    assert (result.outcome, result.x_pos, result.steps) == ("stall", 40, 50)
    assert result.a_held_at_end and result.repeated_action == "A" and result.repeated_share == 1.0
    # Without the stall cut-off the step limit ends it: a time-out, not a death.
    env = envs.make("mario-1-1", max_episode_steps=30)
    result = greedy_failures.play(AlwaysA, env, seed=0, action_names=env.get_wrapper_attr("action_names"))
    env.close()
    assert (result.outcome, result.steps) == ("timeout", 30)


def test_the_corner_reading_tells_a_network_that_reads_the_block_from_one_that_does_not():
    import torch

    from benchmarks import greedy_failures

    names = ["NOOP", "right", "right A", "right B", "right A B", "A", "left"]

    def reads_block(obs, state, starts):  # (1, B, 4, 84, 84): jumps when the block says A is not held
        not_held = (obs[0, :, -1, 0, 0] == 0).float()
        logits = torch.zeros(obs.shape[1], len(names))
        logits[:, 2] = 5 * not_held  # "right A"
        logits[:, 1] = 2.5  # "right"
        return logits[None], torch.zeros(1, obs.shape[1]), state

    def ignores_block(obs, state, starts):
        logits = obs[0, :, -1, 40:44, 40:44].float().mean(dim=(1, 2))[:, None] * torch.arange(len(names))
        return logits[None], torch.zeros(1, obs.shape[1]), state

    observations = np.random.default_rng(0).integers(0, 256, (6, 4, 84, 84), dtype=np.uint8)
    reading = greedy_failures.read_corner(reads_block, observations, names)
    assert reading.steps == 6 and reading.greedy_changed == 1.0
    e = np.exp  # held: only "right" stands out; not held: "right A" does (3 of the 7 actions press A)
    assert reading.jump_if_held == pytest.approx(3 / (6 + e(2.5)))
    assert reading.jump_if_not_held == pytest.approx((e(5) + 2) / (e(5) + e(2.5) + 5))
    blind = greedy_failures.read_corner(ignores_block, observations, names)
    assert blind.greedy_changed == 0.0 and blind.jump_if_held == pytest.approx(blind.jump_if_not_held)


@pytest.mark.parametrize(
    ("module", "argv", "needle"),
    [
        ("mario_jump_probe", ["runs/no-such-run"], "does not exist"),
        ("mario_route_search", ["cartpole", "--out", "unused.json"], "not a one-stage Mario preset"),
        (
            "mario_route_search",
            ["mario-1-1", "--out", "unused.json", "--route", "envs/routes/1-1.json"],
            "add --shorten",
        ),
        (
            "mario_route_search",
            ["mario-1-2", "--out", "unused.json", "--route", "envs/routes/1-1.json", "--shorten"],
            "has no route of 1-2",
        ),
        (
            "mario_route_search",
            ["mario-1-1", "--out", "unused.json", "--route", "no-such.json", "--shorten"],
            "No such file",
        ),
        ("imitate_probe", ["--route", "no-such-route.json"], "No such file"),
        ("imitate_probe", ["--epochs", "ten"], "whole numbers"),
        ("greedy_failures", ["runs/no-such-run"], "does not exist"),
        ("greedy_failures", ["runs/mario-1-1", "--sticky", "1"], "--sticky in [0, 1)"),
        ("greedy_failures", ["runs/mario-1-1", "--corner"], "--corner needs a PPO agent"),
    ],
)
def test_the_mario_diagnostics_refuse_bad_input_in_one_line(module, argv, needle):
    done = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{module}", *argv], capture_output=True, text=True, cwd=ROOT
    )
    assert done.returncode == 2 and needle in done.stderr and len(done.stderr.strip().splitlines()) == 1


# ---- benchmarks/fast_mario.py and benchmarks/experiments.py -----------------------------------


def test_fast_mario_records_the_time_to_the_target_and_a_run_stopped_by_the_clock(tmp_path):
    from benchmarks import fast_mario

    common = ["--env", "cartpole", "--set", "eval_every=1000", "--set", "eval_episodes=2", "--sticky-episodes", "0",
              "--root", str(tmp_path / "runs"), "--records", str(tmp_path / "records")]  # fmt: skip
    # Any greedy CartPole episode lasts at least 8 steps: the first periodic eval reaches the target.
    assert (
        fast_mario.main(["run", "--seeds", "1", "--name", "easy", "--until", "length_mean=1", *common]) == 0
    )
    easy = json.loads((tmp_path / "records" / "easy-s1.json").read_text())
    assert easy["reached"] and easy["reached_at_step"] <= 1000 + 128 and easy["reached_after_seconds"] > 0
    assert easy["evals"][0]["step"] == easy["reached_at_step"] and easy["history"][-1]["seconds"] > 0
    # A target no run reaches: stopped by the clock (SIGTERM, a checkpoint), recorded as not reached; 12 s,
    # as on a busy machine lab's start-up alone can take more than a second.
    argv = ["run", "--seeds", "2", "--name", "never", "--until", "return_mean=1e9", "--minutes", "0.2",
            "--set", "total_steps=10000000", *common]  # fmt: skip
    assert fast_mario.main(argv) == 0
    never = json.loads((tmp_path / "records" / "never-s2.json").read_text())
    assert not never["reached"] and never["steps"] > 0 and never["reached_after_seconds"] is None
    assert (tmp_path / "runs" / "never-s2" / "checkpoints").is_dir()
    # The same run recorded by `record` (as for a run stopped by hand): its own clock, no load averages.
    (tmp_path / "records" / "never-s2.json").unlink()
    argv = ["record", "--seeds", "2", "--name", "never", "--until", "return_mean=1e9", "--set", "total_steps=10000000", *common]  # fmt: skip
    with pytest.raises(SystemExit, match="record needs --note"):
        fast_mario.main(argv)
    assert fast_mario.main([*argv, "--note", "stopped by the clock"]) == 0
    again = json.loads((tmp_path / "records" / "never-s2.json").read_text())
    assert again["note"] == "stopped by the clock" and again["load_before"] is None
    assert (again["steps"], again["history"], again["reached"]) == (never["steps"], never["history"], False)
    assert 0 < again["wall_seconds"] <= never["wall_seconds"]
    assert again["command"] == never["command"]
    with pytest.raises(SystemExit, match="exists already"):
        fast_mario.main([*argv, "--note", "twice"])
    # A recorded seed is not run again; the report reads both records.
    assert (
        fast_mario.main(["run", "--seeds", "1", "--name", "easy", "--until", "length_mean=1", *common]) == 0
    )
    plot = tmp_path / "curves.png"
    out = tmp_path / "report.json"
    argv = ["report", "--records", str(tmp_path / "records"), "--plot", str(plot), "--json", str(out)]
    assert fast_mario.main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(row["name"], row["reached"]) for row in rows] == [("easy", True), ("never", False)]
    assert plot.stat().st_size > 0


@pytest.mark.parametrize("module", ["fast_mario", "ssl_rl_experiment"])
def test_the_experiment_scripts_refuse_bad_seeds_with_exit_2(module):
    done = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{module}", "report", "--seeds", "1,x"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert done.returncode == 2 and "--seeds takes comma-separated integers, got '1,x'" in done.stderr
    assert "Traceback" not in done.stderr


def test_run_state_reads_the_newest_of_metrics_and_checkpoint(tmp_path):
    from agents.engine import save_training_checkpoint
    from benchmarks.experiments import run_state

    run = tmp_path / "run"
    run.mkdir()
    first = {"steps": 100, "history": [{"step": 100}], "evals": [], "until": {"reached_at_step": 100}}
    (run / "metrics.json").write_text(json.dumps(first))
    save_training_checkpoint(run, 100, {"history": [{"step": 100}], "evals": []}, {}, keep=1)
    assert run_state(run).until == {"reached_at_step": 100}  # finished: its metrics.json
    # Resumed past the finish and stopped: the checkpoint is newer than the old metrics.json.
    save_training_checkpoint(run, 200, {"history": [{"step": 100}, {"step": 200}], "evals": []}, {}, keep=1)
    state = run_state(run)
    assert [record["step"] for record in state.history] == [100, 200] and state.until is None


def test_discounted_returns_and_the_routes_turn():
    from benchmarks.branch_returns import discounted_returns, turn_step

    assert discounted_returns([1.0, 1.0, 1.0], 0.5).tolist() == [1.75, 1.5, 1.0]
    # Two walks back: 30 -> 25 (5 pixels) and 40 -> 10 (30 pixels); the turn is the deeper one's.
    assert turn_step([10, 20, 30, 25, 40, 10, 50]) == (4, 30)
    assert turn_step([10, 20, 30]) == (0, 0)


def test_branch_returns_on_1_3_favour_the_dead_end_under_gamma_0_9_and_the_route_under_0_99(tmp_path):
    """The World-1 agent's low route against the high route that reaches 1-3's flag (RESULTS.md)."""
    out = tmp_path / "returns.json"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.branch_returns", "runs/mario-world-1-training", "--preset", "mario-1-3",
         "--route", "envs/routes/1-3.json", "--gammas", "0.9,0.99", "--json", str(out)],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    record = json.loads(out.read_text())
    assert record["route_cleared"] and not record["agent_cleared"] and record["turn_back_pixels"] >= 64
    (low, high) = record["returns"]
    assert low["route_return"] < low["agent_return"] and high["route_return"] > high["agent_return"]
    bad = subprocess.run(
        [sys.executable, "-m", "benchmarks.branch_returns", "runs/mario-world-1-training", "--gammas", "0.9,x"],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert bad.returncode == 2 and "--gammas" in bad.stderr and "Traceback" not in bad.stderr
    outside = subprocess.run(
        [sys.executable, "-m", "benchmarks.branch_returns", "runs/mario-world-1-training", "--at", "300"],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert outside.returncode == 2 and "--at must be a step of the route, 0 to 299" in outside.stderr


def test_route_start_probe_replays_the_route_and_lets_the_agent_take_over(tmp_path, capsys):
    """From route step 80 of 1-3 the route's own actions pass the low route's dead end (x 783), with
    sticky actions too; a horizon too short to get there passes nothing; an agent takes over."""
    from benchmarks.route_start_probe import main

    out = tmp_path / "starts.json"
    assert main(["--route-actions", "--at", "75,80", "--past", "790", "--episodes", "3", "--horizon", "85",
                 "--json", str(out)]) == 0  # fmt: skip
    record = json.loads(out.read_text())
    assert [start["route_step"] for start in record["starts"]] == [75, 80]
    assert all(start["passed"] == start["episodes"] == 3 for start in record["starts"])
    assert record["starts"][0]["route_x"] < record["starts"][1]["route_x"] < 790
    assert main(["--route-actions", "--at", "80", "--past", "790", "--episodes", "2", "--horizon", "5",
                 "--sticky", "0", "--json", str(out)]) == 0  # fmt: skip
    (start,) = json.loads(out.read_text())["starts"]
    assert start["passed"] == 0 and max(start["furthest_xs"]) < 790
    assert main(["runs/mario-1-3-backward-training", "--at", "200", "--episodes", "2", "--horizon", "20",
                 "--greedy", "--json", str(out)]) == 0  # fmt: skip
    (start,) = json.loads(out.read_text())["starts"]
    assert start["episodes"] == 2 and start["furthest_xs"] == sorted(start["furthest_xs"])
    assert min(start["furthest_xs"]) >= start["route_x"]
    capsys.readouterr()
    assert main([]) == 2 and "--route-actions" in capsys.readouterr().err
    assert main(["--route-actions", "--at", "300"]) == 2
    assert "--at must be route steps 0 to 299" in capsys.readouterr().err
    assert main(["--route-actions", "--at", "7x"]) == 2 and "--at" in capsys.readouterr().err
    assert main(["runs/no-such-run"]) == 2 and "Traceback" not in capsys.readouterr().err
