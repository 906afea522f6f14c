"""The run engine's one shutdown behaviour (agents/engine.py, ARCHITECTURE.md "Stopping"), checked for
every algorithm from the same tests: a full disk, a read-only run directory, Ctrl-C, SIGTERM, NaNs
that persist and NaNs that heal, and the resumes after them; and `--until`, which ends a run early."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from agents import ALGOS, dqn, engine, ppo
from tests.test_reliability import (
    TINY_DQN,
    TINY_PPO,
    assert_no_debris,
    assert_one_line_exit_2,
    no_plots,  # noqa: F401  (fixture)
    run_main,
    snapshot,
)

ROOT = Path(__file__).resolve().parents[1]
# Per algorithm: its tiny CartPole settings and the agent steps of its first and second checkpoint.
TINY = {"ppo": (TINY_PPO, 128, 256), "dqn": (TINY_DQN, 200, 400)}
ALGO_NAMES = list(ALGOS)


def train_argv(algo: str, run_dir: Path, steps: int) -> list[Any]:
    return ["train", "cartpole", "--run-dir", run_dir, "--steps", steps, *TINY[algo][0]]


def checkpoint_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.stem.rsplit("_", 1)[-1]) for p in (run_dir / "checkpoints").glob("step_*.json"))


@pytest.mark.parametrize("algo", ALGO_NAMES)
def test_a_full_disk_stops_with_the_last_good_checkpoint_then_resumes(algo, tmp_path, full_disk, capsys):
    run_dir, (_, first, second) = tmp_path / "run", TINY[algo]
    full_disk(lambda path: "/checkpoints/" in path and f".step_{first:012d}." not in path)
    code, _, err = run_main(train_argv(algo, run_dir, 3 * first), capsys)
    line = assert_one_line_exit_2(
        code, err, "no space left on device", f"step {first}", f"lab train --resume {run_dir}"
    )
    assert f"step_{second:012d}" in line
    assert_no_debris(run_dir)
    assert engine.load_training_checkpoint(run_dir)[0]["global_step"] == first
    full_disk(None)  # space is freed: the run continues from the kept checkpoint and finishes
    code, out, err = run_main(["train", "--resume", run_dir, "--no-progress", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["steps"] == 3 * first


@pytest.mark.parametrize("algo", ALGO_NAMES)
def test_a_read_only_run_dir_is_refused_before_anything_is_written(algo, tmp_path, read_only, capsys):
    run_dir = tmp_path / "locked"
    run_dir.mkdir()
    read_only(run_dir)
    code, _, err = run_main(train_argv(algo, run_dir, TINY[algo][1]), capsys)
    assert_one_line_exit_2(code, err, str(run_dir), "read-only", "nothing was changed")
    assert snapshot(run_dir) == {}


def interrupt_after(monkeypatch, module: Any, calls: int, error: BaseException) -> None:
    """Raises ``error`` from the algorithm's ``calls``-th env step (a Ctrl-C arrives mid-collection)."""
    real = module.TrainingRun.make_vec_env
    count = {"n": 0}

    def make_vec_env(self: Any, *args: Any, **kwargs: Any) -> Any:
        vec_env = real(self, *args, **kwargs)
        real_step = vec_env.step

        def step(actions: Any) -> Any:
            count["n"] += 1
            if count["n"] == calls:
                raise error
            return real_step(actions)

        vec_env.step = step
        return vec_env

    monkeypatch.setattr(module.TrainingRun, "make_vec_env", make_vec_env)


@pytest.mark.parametrize("algo", ALGO_NAMES)
def test_ctrl_c_saves_a_checkpoint_and_the_resumed_run_finishes(algo, tmp_path, monkeypatch, capsys):
    run_dir, (_, first, _) = tmp_path / "run", TINY[algo]
    module = ALGOS[algo]
    # PPO steps its 2 envs 64 times a rollout; DQN steps 2 envs once per 2 agent steps.
    interrupt_after(monkeypatch, module, 64 + 10 if algo == "ppo" else 150, KeyboardInterrupt())
    code, _, err = run_main(train_argv(algo, run_dir, 4 * first), capsys)
    assert code == 130, err
    assert "interrupted" in err and f"lab train --resume {run_dir}" in err and "Traceback" not in err
    saved = engine.load_training_checkpoint(run_dir)[0]["global_step"]
    assert 0 < saved < 4 * first
    assert_no_debris(run_dir)
    monkeypatch.undo()
    code, out, err = run_main(["train", "--resume", run_dir, "--no-progress", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["steps"] == 4 * first


@pytest.mark.parametrize("algo", ALGO_NAMES)
def test_the_seconds_of_a_run_add_up_across_resumes(algo, tmp_path, capsys):
    run_dir, second = tmp_path / "run", TINY[algo][2]
    code, _, err = run_main([*train_argv(algo, run_dir, second), "--no-progress"], capsys)
    assert code == 0, err
    before = engine.load_training_checkpoint(run_dir)[0]["seconds"]
    assert before > 0
    code, out, err = run_main(["train", "--resume", run_dir, "--steps", 2 * second, "--no-progress"], capsys)
    assert code == 0, err
    assert "since the run began" in out
    metrics = json.loads((run_dir / "metrics.json").read_text())
    history = metrics["history"]
    resumed = [record["seconds"] for record in history if record["step"] > second]
    assert resumed and min(resumed) >= before
    # The summary gives both: this process's seconds and the run's, the first process's included.
    assert metrics["run_seconds"] >= before + metrics["train_seconds"] - 0.1
    seconds = [record["seconds"] for record in history]
    assert seconds == sorted(seconds)


@pytest.mark.parametrize("algo", ALGO_NAMES)
def test_a_resume_that_changes_the_config_says_so_in_the_runs_records(algo, tmp_path, capsys):
    run_dir, second = tmp_path / "run", TINY[algo][2]
    code, _, err = run_main(train_argv(algo, run_dir, second), capsys)
    assert code == 0, err
    learning_rate = json.loads((run_dir / "config.json").read_text())["config"]["learning_rate"]
    resume = ["train", "--resume", run_dir, "--no-progress"]
    code, _, err = run_main([*resume, "--steps", 2 * second, "--set", "learning_rate=0.0123"], capsys)
    assert code == 0, err
    code, _, err = run_main([*resume, "--steps", 3 * second], capsys)  # no change but the budget
    assert code == 0, err
    changes = json.loads((run_dir / "metrics.json").read_text())["config_changes"]
    assert changes == [
        {
            "step": second,
            "changes": {"total_steps": [second, 2 * second], "learning_rate": [learning_rate, 0.0123]},
        },
        {"step": 2 * second, "changes": {"total_steps": [2 * second, 3 * second]}},
    ]
    assert engine.load_training_checkpoint(run_dir)[0]["config_changes"] == changes


def test_a_field_newer_than_the_checkpoint_counts_as_its_default_until_a_resume_sets_it():
    was = {"learning_rate": 0.001}  # written before the field stall_patience existed
    defaults = {"learning_rate": 0.0003, "stall_patience": 0}
    assert engine.config_changes(was, {"learning_rate": 0.001, "stall_patience": 0}, defaults) == {}
    assert engine.config_changes(was, {"learning_rate": 0.001, "stall_patience": 300}, defaults) == {
        "stall_patience": [0, 300]
    }


@pytest.mark.parametrize("algo", ALGO_NAMES)
def test_greedy_evals_are_recorded_in_metrics_and_kept_across_resumes(algo, tmp_path, capsys):
    run_dir, (_, first, second) = tmp_path / "run", TINY[algo]
    every = ["--set", f"eval_every={first}"]
    code, _, err = run_main([*train_argv(algo, run_dir, second), *every], capsys)
    assert code == 0, err
    evals = json.loads((run_dir / "metrics.json").read_text())["evals"]
    periodic = [record for record in evals if not record["final"]]
    assert [record["step"] for record in periodic] == [first, second]
    assert evals[-1]["final"] and evals[-1]["step"] == second
    assert all(record["return_mean"] > 0 and record["seconds"] >= 0 for record in evals)
    code, _, err = run_main(["train", "--resume", run_dir, "--steps", 2 * second, "--no-progress"], capsys)
    assert code == 0, err
    resumed = json.loads((run_dir / "metrics.json").read_text())["evals"]
    # The first process's final eval came after its last checkpoint: the resume keeps the periodic ones.
    assert resumed[: len(periodic)] == periodic
    assert [record["step"] for record in resumed[len(periodic) :] if not record["final"]][-1] == 2 * second


@pytest.mark.parametrize("algo", ALGO_NAMES)
def test_an_error_in_training_saves_what_was_learnt_and_exits_1(algo, tmp_path, monkeypatch, capsys):
    run_dir, (_, first, _) = tmp_path / "run", TINY[algo]
    interrupt_after(
        monkeypatch, ALGOS[algo], 64 + 10 if algo == "ppo" else 150, RuntimeError("emulator exploded")
    )
    code, _, err = run_main(train_argv(algo, run_dir, 4 * first), capsys)
    assert code == 1, err
    assert (
        "emulator exploded" in err and "a checkpoint was saved" in err and len(err.strip().splitlines()) == 1
    )
    assert engine.load_training_checkpoint(run_dir) is not None


def ignore_sigint() -> None:
    # What a non-interactive shell does to a command it starts with `&`.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.parametrize(
    ("algo", "stop"),
    [(algo, signal.SIGTERM) for algo in ALGO_NAMES] + [("ppo", signal.SIGINT)],
)
def test_sigterm_stops_like_ctrl_c(algo, stop, tmp_path):
    # SIGINT goes to a run started in the background by a script, which starts with SIGINT ignored:
    # `kill -INT` must stop it like Ctrl-C all the same.
    run_dir, (_, first, _) = tmp_path / "run", TINY[algo]
    argv = [str(a) for a in train_argv(algo, run_dir, 10_000)]
    process = subprocess.Popen(
        [sys.executable, "-m", "lab", *argv], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)}, preexec_fn=ignore_sigint if stop == signal.SIGINT else None,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not checkpoint_steps(run_dir) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.2)
    process.send_signal(stop)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert f"Resume with: lab train --resume {run_dir}" in err
    assert checkpoint_steps(run_dir) and checkpoint_steps(run_dir)[-1] >= first
    assert_no_debris(run_dir)


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_to_the_whole_process_group_stops_a_run_with_env_workers_cleanly(stop, tmp_path):
    # Ctrl-C in a terminal sends SIGINT to every process of the group, `pkill -f "lab train"` SIGTERM
    # to the workers too (they share the command line): the run alone decides how its workers end,
    # so none of them is taken for a crash and restarted on the way out.
    run_dir = tmp_path / "run"
    argv = [str(a) for a in train_argv("ppo", run_dir, 100_000)] + ["--set", "env_backend=async"]
    process = subprocess.Popen(
        [sys.executable, "-m", "lab", *argv], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not checkpoint_steps(run_dir) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.2)
    time.sleep(0.5)  # in the middle of stepping the workers
    os.killpg(process.pid, stop)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "restarting" not in err and "crash" not in err, err
    assert f"Resume with: lab train --resume {run_dir}" in err
    assert_no_debris(run_dir)


def non_finite_gradients(monkeypatch) -> None:
    """Every gradient step sees a non-finite gradient norm (and so skips its optimizer step)."""
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *args, **kwargs: torch.tensor(float("nan")))


@pytest.mark.parametrize("algo", ALGO_NAMES)
def test_persistent_nans_stop_training_and_keep_the_last_good_checkpoint(algo, tmp_path, monkeypatch, capsys):
    run_dir, (_, first, _) = tmp_path / "run", TINY[algo]
    code, _, err = run_main(train_argv(algo, run_dir, first), capsys)
    assert code == 0, err
    good = engine.load_training_checkpoint(run_dir)[0]
    files = snapshot(run_dir / "checkpoints")
    non_finite_gradients(monkeypatch)
    monkeypatch.setattr(dqn, "MAX_BAD_STEPS", 30)
    unit = {"ppo": "3 updates", "dqn": "30 gradient steps"}[algo]
    code, _, err = run_main(["train", "--resume", run_dir, "--steps", 20 * first, "--no-progress"], capsys)
    assert code == 1, err
    assert f"not finite for {unit} in a row" in err and len(err.strip().splitlines()) == 1
    assert snapshot(run_dir / "checkpoints") == files  # no checkpoint of broken weights
    kept = engine.load_training_checkpoint(run_dir)[0]
    for key, value in good["model"].items():
        assert torch.equal(kept["model"][key], value)


@pytest.mark.parametrize("algo", ALGO_NAMES)
def test_nans_that_heal_only_skip_steps(algo, tmp_path, monkeypatch):
    real = torch.nn.utils.clip_grad_norm_
    calls = {"n": 0}

    def sometimes_nan(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls["n"] += 1
        norm = real(*args, **kwargs)
        return torch.tensor(float("nan")) if calls["n"] % 4 == 0 else norm  # one step in four

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", sometimes_nan)
    module = ALGOS[algo]
    if algo == "ppo":
        config = ppo.PPOConfig(env="cartpole", num_envs=2, num_steps=64, total_steps=512, device="cpu",
                               eval_episodes=1)  # fmt: skip
    else:
        config = dqn.DQNConfig(env="cartpole", num_envs=2, buffer_size=1000, learning_starts=100, total_steps=600,
                               device="cpu", eval_every=0, eval_episodes=1, hidden=(32, 32))  # fmt: skip
    summary = module.train(config, tmp_path / "run", progress=False)
    assert summary["steps"] == config.total_steps and summary["skipped_updates"] > 0
    state = engine.load_training_checkpoint(tmp_path / "run")[0]
    assert all(torch.isfinite(value).all() for value in state["model"].values())
    assert state["skipped_updates"] == summary["skipped_updates"]  # the count survives a resume


@pytest.mark.parametrize("algo", ALGO_NAMES)
def test_runs_written_before_the_engine_still_load_play_and_resume(algo, tmp_path, capsys):
    """Checkpoints of the lab at 99e85bd (before agents/engine.py): tests/data/runs-99e85bd/."""
    import shutil

    from agents import load_agent

    run_dir = tmp_path / algo
    shutil.copytree(ROOT / "tests" / "data" / "runs-99e85bd" / algo, run_dir)
    agent = load_agent(run_dir)
    assert agent.meta["algo"] == algo and agent.policy.trained_steps == 256
    code, out, err = run_main(["eval", run_dir, "--episodes", "2", "--json"], capsys)
    assert code == 0, err
    code, out, err = run_main(
        ["train", "--resume", run_dir, "--steps", "512", "--no-progress", "--json"], capsys
    )
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["steps"] == 512


# ---------------------------------------------------------------------------------------------
# --until: stop once a periodic greedy evaluation reaches a target
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("algo", ALGO_NAMES)
def test_until_stops_at_the_first_eval_that_reaches_the_target(algo, tmp_path, capsys):
    tiny = TINY_PPO if algo == "ppo" else [*TINY_DQN, "--set", "eval_every=256"]
    run_dir = tmp_path / "run"
    argv = ["train", "cartpole", *tiny, "--steps", "20000", "--run-dir", run_dir, "--json"]
    # Any greedy CartPole episode lasts at least 8 steps: the first periodic eval reaches the target.
    code, out, err = run_main([*argv, "--set", "eval_every=256", "--until", "length_mean=1"], capsys)
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    until = summary["until"]
    assert until["metric"] == "length_mean" and until["target"] == 1.0
    assert until["reached_at_step"] is not None and until["reached_at_step"] <= 256 + 64 * 2
    assert summary["steps"] < 20000 and until["reached_after_seconds"] >= 0


def test_until_stops_only_when_a_second_eval_of_the_same_weights_confirms_the_target(
    tmp_path, capsys, monkeypatch
):
    # Scripted returns: eval at 256 meets the target (100 >= 60) but its confirmation (0) pools to 50;
    # eval at 512 meets it again and its confirmation (40) pools to 70: the run stops there.
    scripted = iter([100.0, 0.0, 100.0, 40.0])
    seeds = []
    real = engine.evaluate_preset

    def fake(policy, env, episodes, seed, overrides):
        summary = real(policy, env, episodes, seed, overrides)
        seeds.append(seed)
        return {**summary, "return_mean": next(scripted, 0.0)}

    monkeypatch.setattr(engine, "evaluate_preset", fake)
    argv = ["train", "cartpole", *TINY_PPO, "--steps", "20000", "--run-dir", tmp_path / "run", "--json"]
    code, out, err = run_main([*argv, "--set", "eval_every=256", "--until", "return_mean=60"], capsys)
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["until"]["reached_at_step"] == 512 and summary["steps"] < 1024
    periodic = [
        e for e in json.loads((tmp_path / "run" / "metrics.json").read_text())["evals"] if not e["final"]
    ]
    assert [(e["step"], e["until_return_mean"]) for e in periodic] == [(256, 50.0), (512, 70.0)]
    # the confirmations play other episodes than the evals they confirm
    assert len(set(seeds)) == len(seeds) == 5


def test_until_that_is_never_reached_trains_to_the_budget_and_says_so(tmp_path, capsys):
    run_dir = tmp_path / "run"
    argv = ["train", "cartpole", *TINY_PPO, "--steps", "512", "--run-dir", run_dir]
    code, out, err = run_main([*argv, "--set", "eval_every=256", "--until", "return_mean=1e9"], capsys)
    assert code == 0, err
    assert "target return_mean >= 1000000000.0 not reached in 512 agent steps" in out


@pytest.mark.parametrize(
    ("until", "needle"),
    [
        ("clear_rat=0.9", "METRIC one of return_mean, clear_rate"),
        ("clear_rate=high", "'high' is not a number"),
    ],
)
def test_a_bad_until_is_one_line_and_exit_2(until, needle, tmp_path, capsys):
    run_dir = tmp_path / "run"
    code, _, err = run_main(["train", "cartpole", *TINY_PPO, "--run-dir", run_dir, "--until", until], capsys)
    assert_one_line_exit_2(code, err, needle)
    assert not run_dir.exists()


@pytest.mark.parametrize("algo", ALGO_NAMES)
def test_until_without_periodic_evals_is_refused_for_every_agent(algo, tmp_path, capsys):
    run_dir = tmp_path / "run"
    # `--until` gives eval_every a default; `--set until=...` and the Python API do not.
    argv = [*train_argv(algo, run_dir, 512), "--set", "eval_every=0", "--set", "until=return_mean=100"]
    code, _, err = run_main(argv, capsys)
    assert_one_line_exit_2(code, err, "until needs periodic evaluations: set eval_every")
    assert not run_dir.exists()
