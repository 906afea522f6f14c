"""The runs shipped under runs/ load and act; the compressed ones keep what the README claims of their size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agents import load_agent
from compress.prune import end_layers, prunable_weights

RUNS = Path(__file__).resolve().parents[1] / "runs"
SHIPPED = [
    "mario-1-1",
    "mario-1-1-distilled",
    "mario-1-1-int8",
    "mario-1-1-pruned",
    "mario-1-1-training",
    "mario-1-2-training",
    "mario-1-3-training",
    "mario-1-4-training",
    "mario-world-1-distilled",
    "mario-world-1-training",
]


def weights_bytes(run: str) -> int:
    return sum(path.stat().st_size for path in (RUNS / run / "checkpoints").glob("*.safetensors"))


@pytest.mark.parametrize("run", SHIPPED)
def test_a_shipped_run_loads_and_acts(run):
    if not (RUNS / run / "checkpoints").is_dir():
        pytest.skip(f"runs/{run} is not in this checkout")
    agent = load_agent(RUNS / run, "cpu")
    obs = np.zeros((2, *agent.meta["obs_shape"]), dtype=np.uint8)
    agent.policy.reset(2)
    actions, _ = agent.policy.act(obs, np.ones(2, dtype=bool))
    assert actions.shape == (2,) and all(0 <= a < agent.meta["num_actions"] for a in actions)


def test_the_compressed_agents_are_as_small_as_claimed():
    if not all((RUNS / run / "checkpoints").is_dir() for run in SHIPPED[:3]):
        pytest.skip("the compressed runs are not in this checkout")
    teacher = weights_bytes("mario-1-1")
    assert weights_bytes("mario-1-1-distilled") * 20 <= teacher  # 4 bytes a parameter: 20x fewer
    assert weights_bytes("mario-1-1-int8") * 3.5 <= teacher


def test_the_pruned_agent_is_90_percent_sparse_with_whole_ends():
    if not (RUNS / "mario-1-1-pruned" / "checkpoints").is_dir():
        pytest.skip("runs/mario-1-1-pruned is not in this checkout")
    model = load_agent(RUNS / "mario-1-1-pruned", "cpu").policy.agent
    weights = [layer.weight for layer, _ in prunable_weights(model)]
    zeros = sum(int((weight == 0).sum()) for weight in weights)
    assert zeros / sum(weight.numel() for weight in weights) == pytest.approx(0.9, abs=1e-4)
    for layer in end_layers(model):  # dense_ends: the first layer and the heads keep every weight
        assert int((layer.weight == 0).sum()) == 0


def test_the_world_demo_plays_the_four_stages_into_one_video(tmp_path, capsys):
    from lab.demo import WORLD_RUN, world_demo

    run = RUNS.parent / WORLD_RUN
    if not (run / "checkpoints").is_dir():
        pytest.skip(f"{WORLD_RUN} is not in this checkout")
    summary = world_demo(run, out=tmp_path / "world-1.mp4")
    assert [episode["stage"] for episode in summary["per_episode"]] == ["1-1", "1-2", "1-3", "1-4"]
    assert (tmp_path / "world-1.mp4").stat().st_size > 10_000 and summary["frames"] > 100
    out = capsys.readouterr().out
    assert "World 1-3: return" in out and "1-3: 1-3" not in out and "stages cleared; video:" in out
