"""Fine-tuning a trained agent: ``init_weights`` starts the whole network from another run, and
``keep_zeros`` keeps a pruned network's zero weights at zero while it learns."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from agents import dqn, engine, ppo
from core import runs
from core.checkpoint import load_checkpoint, read_sidecar, save_checkpoint
from tests.test_augment import short_cartpole_config
from tests.test_cli import assert_usage_error


def network_of(algo: str, config) -> torch.nn.Module:
    return ppo.ActorCritic(config, (4,), 2) if algo == "ppo" else dqn.QNetwork(config, (4,), 2)


def saved_run(tmp_path, model_state: dict[str, torch.Tensor], name: str = "source"):
    """A run directory whose newest checkpoint holds ``model_state`` as its model."""
    run_dir = tmp_path / name
    save_checkpoint(run_dir / "checkpoints" / "final", {"model": model_state, "epoch": 1}, {"kind": "task"})
    return run_dir


def random_state(network: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.clone().normal_() for key, value in network.state_dict().items()}


@pytest.mark.parametrize("algo", ["ppo", "dqn"])
def test_init_weights_loads_every_tensor_of_the_network(tmp_path, algo):
    module = ppo if algo == "ppo" else dqn
    network = network_of(algo, module.CONFIG())
    source = random_state(network)
    config = module.CONFIG(init_weights=str(saved_run(tmp_path, source)))
    ppo.setup_network(config, network, [network.encoder], (4,), resumed=False)
    state = network.state_dict()
    assert state.keys() == source.keys()
    assert all(torch.equal(state[key], source[key]) for key in source)


def test_a_resumed_run_keeps_its_own_weights(tmp_path):
    network = network_of("ppo", ppo.PPOConfig())
    before = {key: value.clone() for key, value in network.state_dict().items()}
    config = ppo.PPOConfig(init_weights=str(saved_run(tmp_path, random_state(network))))
    ppo.setup_network(config, network, [network.encoder], (4,), resumed=True)
    assert all(torch.equal(before[key], value) for key, value in network.state_dict().items())


def test_init_weights_refuses_a_recurrent_agent_in_a_feed_forward_one_in_one_line(tmp_path, capsys):
    recurrent = ppo.ActorCritic(ppo.PPOConfig(memory="gru", shared_encoder=False), (4,), 2)
    run_dir = saved_run(tmp_path, recurrent.state_dict())
    line = assert_usage_error(
        ["train", "cartpole", "--steps", "256", "--device", "cpu", "--no-progress",
         "--run-dir", str(tmp_path / "run"), "--set", f"init_weights={run_dir}"],
        capsys, "init_weights", "memory",
    )  # fmt: skip
    assert "lacks" in line
    # The run never started: nothing of it stays behind, so the same command can run again.
    assert not (tmp_path / "run").exists()


def test_init_weights_refuses_another_net_and_init_encoder_beside_it(tmp_path, capsys):
    wider = ppo.ActorCritic(ppo.PPOConfig(hidden=(32, 32), shared_encoder=False), (4,), 2)
    run_dir = saved_run(tmp_path, wider.state_dict())
    assert_usage_error(
        ["train", "cartpole", "--steps", "256", "--device", "cpu", "--no-progress",
         "--run-dir", str(tmp_path / "run"), "--set", f"init_weights={run_dir}"],
        capsys, "init_weights", "(32, 4)", "(64, 4)",
    )  # fmt: skip
    kept = tmp_path / "kept"  # a --run-dir that existed before: emptied of the run's config, kept
    kept.mkdir()
    assert_usage_error(
        ["train", "cartpole", "--steps", "256", "--device", "cpu", "--no-progress",
         "--run-dir", str(kept), "--set", f"init_weights={run_dir}"],
        capsys, "init_weights",
    )  # fmt: skip
    assert kept.is_dir() and not any(kept.iterdir())
    assert_usage_error(
        ["train", "cartpole", "--steps", "256", "--device", "cpu", "--no-progress",
         "--run-dir", str(tmp_path / "run2"), "--set", f"init_weights={run_dir}",
         "--set", f"init_encoder={run_dir}"],
        capsys, "init_weights", "init_encoder", "not both",
    )  # fmt: skip
    assert not (tmp_path / "run2").exists()  # refused before the run directory is made


@pytest.mark.parametrize("algo", ["ppo", "dqn"])
def test_keep_zeros_fine_tunes_a_pruned_network_and_keeps_its_zeros(tmp_path, algo):
    module = ppo if algo == "ppo" else dqn
    network = network_of(algo, short_cartpole_config(algo))
    # Half of every weight matrix pruned: the zeros are where a fixed generator says.
    generator = torch.Generator().manual_seed(0)
    pruned = {
        key: value * (torch.rand(value.shape, generator=generator) < 0.5) if key.endswith("weight") else value
        for key, value in network.state_dict().items()
    }
    zeros = {key: value == 0 for key, value in pruned.items() if key.endswith("weight")}
    config = short_cartpole_config(algo, init_weights=str(saved_run(tmp_path, pruned)), keep_zeros=True)
    (tmp_path / "agent").mkdir()
    module.train(config, tmp_path / "agent", progress=False)
    state, _ = load_checkpoint(runs.locate_checkpoint(tmp_path / "agent")[0])
    model = state["model"]
    for key, mask in zeros.items():
        assert torch.count_nonzero(model[key][mask]) == 0, key
    changed = [key for key in zeros if not torch.equal(model[key], pruned[key])]
    assert changed  # the surviving weights did learn


def test_without_keep_zeros_the_pruned_weights_come_back(tmp_path):
    # The check above can fail: the same fine-tuning without keep_zeros revives pruned weights.
    network = network_of("ppo", short_cartpole_config("ppo"))
    pruned = {key: value * 0 if key.endswith("weight") and "actor" in key else value
              for key, value in network.state_dict().items()}  # fmt: skip
    (tmp_path / "agent").mkdir()
    config = short_cartpole_config("ppo", init_weights=str(saved_run(tmp_path, pruned)))
    ppo.train(config, tmp_path / "agent", progress=False)
    state, _ = load_checkpoint(runs.locate_checkpoint(tmp_path / "agent")[0])
    assert torch.count_nonzero(state["model"]["head.actor.0.weight"]) > 0


@pytest.mark.parametrize("algo", ["ppo", "dqn"])
def test_a_fine_tuned_run_records_which_checkpoint_it_started_from(tmp_path, algo):
    module = ppo if algo == "ppo" else dqn
    network = network_of(algo, short_cartpole_config(algo))
    source = saved_run(tmp_path, random_state(network))
    sidecar = runs.locate_checkpoint(source)[0]
    config = short_cartpole_config(algo, init_weights=str(source))
    (tmp_path / "agent").mkdir()
    module.train(config, tmp_path / "agent", progress=False)
    expected = {
        "option": "init_weights", "path": str(source), "checkpoint": str(sidecar), "step": None,
        "weights_sha256": read_sidecar(sidecar)["weights_sha256"],
    }  # fmt: skip
    assert json.loads((tmp_path / "agent" / "metrics.json").read_text())["start_weights"] == [expected]
    # A later checkpoint at the same path does not change the record: a resume keeps the first.
    saved_run(tmp_path, random_state(network))
    resumed = dataclasses.replace(config, total_steps=1024)
    module.train(resumed, tmp_path / "agent", progress=False, resume=True)
    assert json.loads((tmp_path / "agent" / "metrics.json").read_text())["start_weights"] == [expected]
    runs.write_run_config(tmp_path / "agent", "algo", algo, resumed)
    engine.export_slim_checkpoint(tmp_path / "agent", tmp_path / "slim")  # what a session commits
    state, _ = load_checkpoint(runs.locate_checkpoint(tmp_path / "slim")[0])
    assert state["start_weights"] == [expected]


def test_a_run_from_scratch_records_no_start_weights(tmp_path):
    (tmp_path / "agent").mkdir()
    ppo.train(short_cartpole_config("ppo"), tmp_path / "agent", progress=False)
    assert json.loads((tmp_path / "agent" / "metrics.json").read_text())["start_weights"] == []
