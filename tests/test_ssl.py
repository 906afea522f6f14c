"""Self-supervised pre-training (``lab fit ssl``): NT-Xent against a naive sum, MAE's masking, the
Mario frame bookkeeping (positives, episode split, buckets), label subsets, and smoke runs whose
encoder an agent then starts from."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from agents import ppo
from core.checkpoint import load_checkpoint
from core.runs import locate_checkpoint
from tasks import ssl
from tasks.loop import TaskError
from tests.test_cli import run_main


def naive_nt_xent(z1, z2, temperature):
    """SimCLR's loss written out: for each of the 2B views, -log of its twin's share of exp(cos / t)
    over every other view."""
    views = [F.normalize(z, dim=0) for z in [*z1, *z2]]
    batch = len(z1)
    total = 0.0
    for i, anchor in enumerate(views):
        twin = (i + batch) % (2 * batch)
        scores = {k: math.exp(float(anchor @ other) / temperature) for k, other in enumerate(views) if k != i}
        total += -math.log(scores[twin] / sum(scores.values()))
    return total / (2 * batch)


def test_nt_xent_equals_the_naive_sum_on_a_hand_made_batch():
    z1 = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [1.0, 1.0, 1.0]])
    z2 = torch.tensor([[0.9, 0.1, 0.0], [0.0, 1.0, -0.5], [-1.0, 1.0, 0.5]])
    for temperature in (0.1, 0.5, 1.0):
        fast = ssl.nt_xent(z1, z2, temperature).item()
        assert fast == pytest.approx(naive_nt_xent(z1, z2, temperature), rel=1e-5)


def test_nt_xent_is_small_when_twins_agree_and_others_differ():
    twins = torch.eye(4) * 5
    assert ssl.nt_xent(twins, twins, 0.1).item() < 1e-3
    assert ssl.nt_xent(twins, twins.roll(1, dims=0), 0.1).item() > 5


def test_mae_hides_the_requested_share_of_patches_and_patchify_is_the_embeddings_order():
    torch.manual_seed(0)
    vit = ssl.build_encoder(ssl.SSLConfig(net="vit"), (1, 8, 8))  # 2x2 patches: a 4x4 grid
    mae = ssl.MaskedAutoencoder(vit, mask_ratio=0.75)
    images = torch.rand((2, 1, 8, 8))
    patches = mae.patchify(images)
    assert patches.shape == (2, 16, 4)
    assert torch.equal(F.fold(patches.transpose(1, 2), (8, 8), kernel_size=2, stride=2), images)
    # The patch embedding is a stride-2 convolution: its output for patch p is a function of patches[:, p].
    embedded = vit.patch_embed(images).flatten(2).transpose(1, 2)  # (2, 16, dim)
    weight = vit.patch_embed.weight.flatten(1)  # (dim, 4)
    torch.testing.assert_close(embedded, patches @ weight.T + vit.patch_embed.bias, atol=1e-6, rtol=0)
    loss = mae.loss(images, torch.rand((2, 16)))
    loss.backward()
    assert loss.item() > 0 and vit.patch_embed.weight.grad is not None


def frame_set(episodes, steps):
    """A FrameSet of blank stacks whose episode and step columns are given."""
    n = len(episodes)
    return ssl.FrameSet(
        frames=np.zeros((n, 4, 84, 84), np.uint8), x_pos=np.arange(n, dtype=np.int32) * 300,
        episode=np.array(episodes, np.int32), step=np.array(steps, np.int32), stage=np.zeros(n, np.int16),
        expert_action=np.full(n, -1, np.int16), stage_names=("1-1",),
    )  # fmt: skip


def test_positives_are_the_frame_a_few_steps_later_in_the_same_episode():
    frames = frame_set([0, 0, 0, 0, 1, 1, 1], [0, 1, 2, 3, 0, 1, 2]).sorted()
    assert ssl.positive_index(frames, 2).tolist() == [2, 3, -1, -1, 6, -1, -1]
    assert ssl.positive_index(frames, 1).tolist() == [1, 2, 3, -1, 5, 6, -1]


def test_the_split_keeps_every_episode_on_one_side():
    episodes = np.repeat(np.arange(20), 5)
    frames = frame_set(episodes, np.tile(np.arange(5), 20))
    train, test = ssl.split_episodes(frames, 0.25, seed=3)
    assert train.sum() + test.sum() == 100 and 15 <= test.sum() <= 25
    for episode in range(20):
        assert len(set(test[episodes == episode])) == 1


def test_position_buckets_are_screens_pooled_at_the_end():
    assert ssl.position_bucket(np.array([0, 255, 256, 3161, 10_000])).tolist() == [0, 0, 1, 12, 15]


def test_frame_sets_merge_with_distinct_episodes_and_stages(tmp_path):
    a, b = frame_set([0, 0, 1], [0, 1, 0]), frame_set([0, 1], [0, 0])
    b.stage_names = ("1-2",)
    merged = ssl.FrameSet.concat([a, b])
    assert len(np.unique(merged.episode)) == 4 and merged.stage_names == ("1-1", "1-2")
    assert sorted(merged.stage.tolist()) == [0, 0, 0, 1, 1]
    merged.save(tmp_path / "frames.npz")
    again = ssl.FrameSet.load(tmp_path / "frames.npz")
    assert np.array_equal(again.episode, merged.episode) and again.stage_names == merged.stage_names
    with pytest.raises(TaskError, match="frames file"):
        ssl.FrameSet.load(tmp_path / "missing.npz")


def test_label_subsets_are_stratified_with_every_class():
    labels = torch.arange(200) % 10
    for fraction, size in ((0.01, 10), (0.1, 20), (1.0, 200)):
        index = ssl.label_subset(labels, fraction, seed=0)
        assert len(index) == size and len(labels[index].unique()) == 10


@pytest.mark.parametrize(
    ("changes", "needle"),
    [({"method": "mae", "net": "nature"}, "net=vit"), ({"method": "atc"}, "data=mario")],
)
def test_methods_that_do_not_fit_the_net_or_data_are_refused(changes, needle):
    with pytest.raises(TaskError, match=needle):
        ssl.resolve_method(ssl.SSLConfig(**changes))


def test_smoke_digits_simclr_writes_probes_and_a_picture(tmp_path, capsys):
    code, out, _ = run_main(
        ["fit", "ssl", "--epochs", "1", "--device", "cpu", "--no-progress", "--json", "--run-dir",
         str(tmp_path / "run"), "--set", "label_fractions=0.1", "--set", "finetune_steps=3", "--set", "plot=pca"],
        capsys,
    )  # fmt: skip
    assert code == 0
    metrics = json.loads(out)
    probe = metrics["probes"]["10%"]
    assert probe["labels"] == 144
    assert set(probe) == {"labels", "linear_probe", "untrained_probe", "fine_tune", "scratch"}
    assert all(0.0 <= probe[key] <= 1.0 for key in probe if key != "labels")
    assert (tmp_path / "run" / "embeddings.png").exists() and metrics["method"] == "simclr"


def test_smoke_digits_mae_on_the_vit(tmp_path):
    from tasks import run as run_task

    metrics = run_task(
        "ssl", tmp_path, net="vit", method="mae", epochs=1, device="cpu", label_fractions=(1.0,),
        finetune_steps=2, plot="pca",
    )  # fmt: skip
    assert metrics["method"] == "mae" and math.isfinite(metrics["train_loss"])
    assert "100%" in metrics["probes"]


@pytest.mark.slow
def test_smoke_mario_atc_encoder_starts_a_ppo_agent(tmp_path):
    from tasks import run as run_task

    metrics = run_task(
        "ssl", tmp_path / "ssl", data="mario", epochs=1, device="cpu", stages=("1-1",), random_steps=40,
        batch_size=64, plot="pca",
    )  # fmt: skip
    assert metrics["method"] == "atc" and metrics["frames"] == 320
    probe = metrics["probes"]["position_bucket"]
    assert {"pretrained", "random_init", "majority"} <= set(probe)
    # The pre-trained encoder is what `lab train mario-1-1 --set init_encoder=...` starts from.
    config = ppo.PPOConfig(net="nature", init_encoder=str(tmp_path / "ssl"))
    agent = ppo.ActorCritic(config, (4, 84, 84), 7)
    ppo.setup_network(config, agent, [agent.encoder], (4, 84, 84), resumed=False)
    state, _ = load_checkpoint(locate_checkpoint(tmp_path / "ssl")[0])
    for key, value in agent.encoder.state_dict().items():
        assert torch.equal(value, state["model"][f"encoder.{key}"])
    assert any(key.startswith("target_encoder.") for key in state["model"])  # present, and not the one loaded
