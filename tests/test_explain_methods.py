"""Tests of explain/: attribution methods, score functions, faithfulness checks and pictures.

Small hand-made models whose right answer is known: a linear score (gradient x input and integrated
gradients are exactly w * x), a score that is a sum of a few pixels (deleting them first kills it),
a model whose saliency is its weight pattern (randomising the weights destroys the map).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import nets
from explain import faithfulness, methods, render
from explain.methods import METHODS, make_score_fn, to_float_obs

IMAGE_SHAPE = (2, 16, 16)
VECTOR_DIM = 6


def tiny_cnn(num_actions: int = 3) -> nn.Module:
    """(B, 2, 16, 16) -> (B, num_actions) logits; two convolutions, like a miniature NatureCNN."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, stride=2),  # 16 -> 7
        nn.ReLU(),
        nn.Conv2d(4, 8, 3),  # 7 -> 5
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 5 * 5, num_actions),
    ).eval()


def tiny_mlp(num_actions: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(VECTOR_DIM, 16), nn.Tanh(), nn.Linear(16, num_actions)).eval()


class ActorCritic(nn.Module):
    """Returns (logits, value) like the lab's PPO agents."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = tiny_cnn(8)
        self.actor = nn.Linear(8, 3)
        self.critic = nn.Linear(8, 1)

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = torch.relu(self.encoder(obs))
        return self.actor(features), self.critic(features).squeeze(-1)


def image_obs(frames: int = 3, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (frames, *IMAGE_SHAPE), dtype=torch.uint8, generator=generator)


def vector_obs(frames: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(frames, VECTOR_DIM, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# Score functions
# ---------------------------------------------------------------------------------------------


def test_score_functions_read_the_chosen_output_at_a_fixed_index() -> None:
    agent = ActorCritic().eval()
    obs = image_obs(4)
    x = to_float_obs(obs)
    logits, value = agent(x)
    greedy = make_score_fn(agent, obs, "log_prob", output=0)
    torch.testing.assert_close(greedy.index, logits.argmax(-1))
    torch.testing.assert_close(greedy(x), torch.log_softmax(logits, -1).max(-1).values)
    actions = torch.tensor([2, 0, 1, 1])
    prob = make_score_fn(agent, obs, "prob", index=actions, output=0)
    torch.testing.assert_close(prob(x), torch.softmax(logits, -1)[torch.arange(4), actions])
    torch.testing.assert_close(make_score_fn(agent, obs, "value", output=1)(x), value)
    # Two copies of the frames (copy-major): the index repeats with them.
    torch.testing.assert_close(prob(torch.cat([x, x])), prob(x).repeat(2))
    with pytest.raises(ValueError, match="not a whole number of copies"):
        prob(x[:3])
    with pytest.raises(ValueError, match="unknown score kind 'policy'; valid: log_prob"):
        make_score_fn(agent, obs, "policy")


def test_uint8_frames_become_the_floats_the_lab_cnns_see() -> None:
    encoder = nets.NatureCNN(in_shape=(1, 8, 8))
    pixels = torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8)
    floats = to_float_obs(pixels)
    assert floats.dtype == torch.float32 and float(floats.max()) <= 1.0
    torch.testing.assert_close(encoder(floats), encoder(pixels), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Methods: shapes, exact answers, completeness
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_gives_a_finite_map_of_the_observation_shape_on_a_cnn(name: str) -> None:
    model = tiny_cnn()
    obs = image_obs(3)
    maps = METHODS[name](make_score_fn(model, obs, "log_prob"), obs, module=model)
    assert maps.shape == obs.shape
    assert maps.dtype == torch.float32
    assert torch.isfinite(maps).all()
    assert maps.abs().sum() > 0


@pytest.mark.parametrize("name", ["saliency", "gradient_x_input", "integrated_gradients"])
def test_gradient_methods_give_a_finite_map_of_the_observation_shape_on_an_mlp(name: str) -> None:
    model = tiny_mlp()
    obs = vector_obs(4)
    maps = METHODS[name](make_score_fn(model, obs, "q_value"), obs, module=model)
    assert maps.shape == obs.shape
    assert torch.isfinite(maps).all()
    assert maps.abs().sum() > 0


def test_image_only_methods_refuse_vector_observations_in_one_line() -> None:
    model = tiny_mlp()
    obs = vector_obs(2)
    score = make_score_fn(model, obs, "q_value")
    with pytest.raises(ValueError, match="needs image observations") as error:
        methods.perturbation(score, obs)
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="needs image observations"):
        methods.integrated_gradients(score, obs, baseline="blur")


def test_gradient_x_input_and_integrated_gradients_equal_w_times_x_on_a_linear_model() -> None:
    torch.manual_seed(1)
    linear = nn.Sequential(nn.Flatten(), nn.Linear(2 * 4 * 4, 1))  # f(x) = w . x + b
    obs = torch.rand(3, 2, 4, 4)
    expected = linear[1].weight.detach().reshape(2, 4, 4) * obs
    score = make_score_fn(linear, obs, "value")
    torch.testing.assert_close(methods.gradient_x_input(score, obs), expected)
    result = methods.integrated_gradients_with_delta(score, obs, steps=4, baseline="zero")
    torch.testing.assert_close(result.maps, expected)
    torch.testing.assert_close(result.score_gap, expected.sum(dim=(1, 2, 3)))
    assert methods.completeness_error(result).max() < 1e-4
    torch.testing.assert_close(
        methods.saliency(score, obs), linear[1].weight.detach().reshape(2, 4, 4).abs().expand_as(obs)
    )


def test_integrated_gradients_are_complete_on_a_nonlinear_model_with_enough_steps() -> None:
    model = tiny_mlp()
    obs = vector_obs(8, seed=3) * 2
    score = make_score_fn(model, obs, "log_prob")
    result = methods.integrated_gradients_with_delta(score, obs, steps=64)
    errors = methods.completeness_error(result)
    assert errors.shape == (8,)
    assert errors.max() < 0.01, errors
    # captum's delta is sum(maps) - (F(x) - F(baseline)).
    torch.testing.assert_close(result.delta, result.maps.sum(1) - result.score_gap, atol=1e-5, rtol=1e-4)
    coarse = methods.completeness_error(methods.integrated_gradients_with_delta(score, obs, steps=2))
    assert coarse.max() > errors.max()  # the error measures something: too few steps show it


def test_integrated_gradients_from_a_blurred_baseline_integrate_to_the_score_gap() -> None:
    model = tiny_cnn()
    obs = image_obs(4, seed=2)
    score = make_score_fn(model, obs, "logit")
    result = methods.integrated_gradients_with_delta(score, obs, steps=128, baseline="blur", blur_sigma=2.0)
    x = to_float_obs(obs)
    torch.testing.assert_close(result.score_gap, (score(x) - score(methods.gaussian_blur(x, 2.0))).detach())
    assert result.maps.shape == obs.shape
    assert methods.completeness_error(result).median() < 0.01


@pytest.mark.parametrize("name", ["integrated_gradients", "perturbation", "saliency"])
def test_a_batch_explains_each_frame_as_if_it_were_alone(name: str) -> None:
    # Each frame has its own action; a method that mixed up the copy-major layout would pair frames
    # with the wrong actions.
    model = tiny_cnn()
    obs = image_obs(3, seed=4)
    actions = torch.tensor([0, 2, 1])
    batch = METHODS[name](
        make_score_fn(model, obs, "q_value", index=actions), obs, module=model, batch_rows=7
    )
    for frame in range(3):
        one = obs[frame : frame + 1]
        alone = METHODS[name](make_score_fn(model, one, "q_value", index=actions[frame : frame + 1]), one)
        torch.testing.assert_close(batch[frame : frame + 1], alone, atol=1e-5, rtol=1e-4)


def test_grad_cam_is_one_non_negative_map_per_frame_repeated_over_channels() -> None:
    model = tiny_cnn()
    obs = image_obs(2)
    assert methods.last_conv_layer(model) is model[2]
    maps = methods.grad_cam(make_score_fn(model, obs, "log_prob"), obs, module=model)
    assert (maps >= 0).all()
    torch.testing.assert_close(maps[:, 0], maps[:, 1])


def test_grad_cam_on_an_mlp_raises_a_one_line_error() -> None:
    model = tiny_mlp()
    obs = vector_obs(2)
    with pytest.raises(
        ValueError, match="Sequential has no convolutional layer; Grad-CAM needs one; use saliency"
    ) as error:
        METHODS["grad_cam"](make_score_fn(model, obs, "q_value"), obs, module=model)
    assert "\n" not in str(error.value)


def test_grad_cam_says_so_when_the_score_never_runs_the_layer() -> None:
    model, other = tiny_cnn(), tiny_cnn()
    obs = image_obs(2)
    with pytest.raises(ValueError, match="never runs the layer"):
        methods.grad_cam(make_score_fn(model, obs, "log_prob"), obs, module=other)


def test_unknown_method_names_the_valid_ones_in_one_line() -> None:
    with pytest.raises(ValueError) as error:
        methods.get_method("lime")
    message = str(error.value)
    assert message.startswith("unknown method 'lime'; valid: ")
    assert all(name in message for name in METHODS)
    assert "\n" not in message


def test_perturbation_finds_the_pixel_the_score_reads() -> None:
    obs = torch.zeros(1, 1, 20, 20)
    obs[0, 0, 8, 12] = 1.0  # a bright dot that blurring dims

    def score(x: torch.Tensor) -> torch.Tensor:
        return x[:, 0, 8, 12]

    heat = methods.to_heatmap(methods.perturbation(score, obs, stride=5)[0])
    row, col = np.unravel_index(heat.argmax(), heat.shape)
    assert abs(row - 8) <= 3 and abs(col - 12) <= 3
    assert heat[18, 2] < 0.05  # far from the dot nothing changes
    # Patches are blurred, not blanked: blurring a flat grey frame changes nothing, so nothing is salient.
    flat = torch.full((1, 1, 20, 20), 0.5)
    assert methods.perturbation(score, flat).abs().max() < 1e-10


def test_to_heatmap_sums_channels_and_scales_to_unit_range() -> None:
    maps = torch.zeros(2, 3, 5, 5)
    maps[0, :, 1, 2] = torch.tensor([1.0, -2.0, 0.5])
    maps[0, 0, 4, 4] = 1.75
    heat = methods.to_heatmap(maps)
    assert heat.shape == (2, 5, 5)
    assert heat[0, 1, 2] == 1.0 and heat[0, 4, 4] == 0.5
    assert (heat[1] == 0).all()  # an empty map stays empty
    assert methods.to_heatmap(maps[0]).shape == (5, 5)


def test_saliency_on_fifty_nature_cnn_frames(capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nets.NatureCNN(in_shape=(4, 84, 84)), nn.Linear(512, 7)).eval()
    obs = torch.randint(0, 256, (50, 4, 84, 84), dtype=torch.uint8)
    start = time.perf_counter()
    maps = methods.saliency(make_score_fn(model, obs, "log_prob"), obs)
    elapsed = time.perf_counter() - start
    assert maps.shape == obs.shape and torch.isfinite(maps).all()
    with capsys.disabled():
        print(f"\nsaliency, 50 frames of (4, 84, 84), NatureCNN + Linear(512, 7): {elapsed:.2f} s")


# ---------------------------------------------------------------------------------------------
# Faithfulness
# ---------------------------------------------------------------------------------------------

KNOWN_PIXELS = ((0, 3, 4), (1, 10, 2), (0, 12, 13))


def sum_of_known_pixels(x: torch.Tensor) -> torch.Tensor:
    return sum(x[:, c, h, w] for c, h, w in KNOWN_PIXELS)


def test_deleting_the_salient_pixels_first_kills_a_score_made_of_them() -> None:
    obs = 0.5 + 0.5 * torch.rand(4, *IMAGE_SHAPE, generator=torch.Generator().manual_seed(0))
    attribution = methods.gradient_x_input(sum_of_known_pixels, obs)
    salient = faithfulness.deletion_curve(sum_of_known_pixels, obs, attribution, mode="zero")
    assert salient.fractions.shape == (21,) and salient.fractions[0] == 0 and salient.fractions[-1] == 1
    assert salient.scores.shape == (4, 21)
    torch.testing.assert_close(torch.from_numpy(salient.scores[:, 0]).float(), sum_of_known_pixels(obs))
    assert (salient.scores[:, 1:] == 0).all()  # 5% of 256 pixels covers the 3 that matter
    random = faithfulness.deletion_curve(
        sum_of_known_pixels, obs, attribution, mode="zero", random_order=True
    )
    assert (salient.scores <= random.scores + 1e-6).all()
    assert (salient.auc < random.auc).all()
    ratio = faithfulness.deletion_ratio(sum_of_known_pixels, obs, attribution, mode="zero", random_repeats=3)
    assert ratio.ratio < 0.2
    blurred = faithfulness.deletion_curve(sum_of_known_pixels, obs, attribution, mode="blur")
    filled = sum_of_known_pixels(methods.gaussian_blur(obs, 5.0)).double().numpy()  # the blur replaces them
    np.testing.assert_allclose(blurred.scores[:, 1:], np.repeat(filled[:, None], 20, axis=1), rtol=1e-5)


def test_random_order_deletion_has_a_ratio_near_one_and_a_linear_curve() -> None:
    obs = torch.rand(32, *IMAGE_SHAPE, generator=torch.Generator().manual_seed(1))

    def total(x: torch.Tensor) -> torch.Tensor:
        return x.sum(dim=(1, 2, 3))

    noise = torch.randn(32, *IMAGE_SHAPE, generator=torch.Generator().manual_seed(2))
    result = faithfulness.deletion_ratio(total, obs, noise, mode="zero")
    assert 0.9 < result.ratio < 1.1
    # Removing pixels of a sum in random order removes the score evenly: half the initial area.
    assert np.allclose(result.random.normalized_auc, 0.5, atol=0.05)


def test_deletion_keeps_each_frame_with_its_own_action() -> None:
    model = tiny_cnn()
    obs = image_obs(3, seed=5)
    score = make_score_fn(model, obs, "prob", index=torch.tensor([1, 0, 2]))
    maps = methods.saliency(score, obs)
    batch = faithfulness.deletion_curve(score, obs, maps, batch_rows=5)
    torch.testing.assert_close(torch.from_numpy(batch.scores[:, 0]).float(), score(to_float_obs(obs)))
    for frame in range(3):
        one = slice(frame, frame + 1)
        alone = make_score_fn(model, obs[one], "prob", index=score.index[one])
        curve = faithfulness.deletion_curve(alone, obs[one], maps[one])
        np.testing.assert_allclose(batch.scores[frame], curve.scores[0], rtol=1e-5, atol=1e-6)


def test_deletion_works_on_vector_observations_with_zero_fill() -> None:
    model = tiny_mlp()
    obs = vector_obs(4)
    score = make_score_fn(model, obs, "prob")
    curve = faithfulness.deletion_curve(
        score, obs, methods.saliency(score, obs), fraction_step=0.25, mode="zero"
    )
    assert curve.scores.shape == (4, 5)
    with pytest.raises(ValueError, match="use mode='zero' for vectors"):
        faithfulness.deletion_curve(score, obs, methods.saliency(score, obs))


def weight_pattern_model() -> nn.Module:
    """f(x) = w . x with a structured w: its saliency |w| is the weight pattern itself."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(2 * 8 * 8, 1))
    with torch.no_grad():
        model[1].weight.copy_(torch.linspace(-1, 3, 128).reshape(1, -1))
    return model


def test_randomising_the_weights_of_a_model_destroys_its_saliency_map() -> None:
    model = weight_pattern_model()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    obs = torch.rand(4, 2, 8, 8)
    report = faithfulness.cascading_randomization(model, methods.module_method("saliency", "value"), obs)
    assert [record.layer for record in report.layers] == ["1"]
    assert report.layers[0].kind == "Linear" and report.layers[0].per_frame.shape == (4,)
    assert abs(report.layers[0].correlation) < 0.5
    assert report.passed and report.decisive_layer == "1"
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0)


def test_a_map_that_ignores_the_model_fails_the_randomisation_test() -> None:
    model = tiny_cnn()
    obs = image_obs(3)

    def edge_detector(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        frames = to_float_obs(x)
        return (frames - methods.gaussian_blur(frames, 1.0)).abs()

    report = faithfulness.cascading_randomization(model, edge_detector, obs)
    assert [record.layer for record in report.layers] == ["5", "2", "0"]  # from the output down
    assert report.decisive_layer == "0"  # the verdict waits until every convolution is random
    assert all(record.correlation == pytest.approx(1.0) for record in report.layers)
    assert not report.passed


def test_cascading_randomization_of_a_cnn_leaves_the_original_untouched() -> None:
    model = tiny_cnn()
    before = [param.detach().clone() for param in model.parameters()]
    obs = image_obs(2)
    report = faithfulness.cascading_randomization(model, methods.module_method("grad_cam", "log_prob"), obs)
    assert len(report.layers) == 3
    assert all(-1.0 <= record.correlation <= 1.0 for record in report.layers)
    for param, old in zip(model.parameters(), before, strict=True):
        torch.testing.assert_close(param.detach(), old, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Pictures
# ---------------------------------------------------------------------------------------------


def test_overlay_and_side_by_side_are_uint8_images_of_the_right_size(tmp_path: Path) -> None:
    stack = image_obs(1)[0]  # (2, 16, 16) uint8: the newest frame is shown
    heat = methods.to_heatmap(torch.rand(2, 4, 4))
    blended = render.overlay(render.frame_to_rgb(stack), heat, colormap="inferno")
    assert blended.shape == (16, 16, 3) and blended.dtype == np.uint8
    picture = render.side_by_side(stack, blended, "action: right+A  Q: 3.21  method: saliency", scale=4)
    assert picture.dtype == np.uint8 and picture.shape[1] == 2 * 64 and picture.shape[0] > 64
    assert picture[64:].max() > 0  # the caption is written
    path = render.save_png(picture, tmp_path / "frame.png")
    assert path.stat().st_size > 0 and [p.name for p in tmp_path.iterdir()] == ["frame.png"]
    with pytest.raises(ValueError, match="unknown colormap 'viridis'"):
        render.overlay(blended, heat, colormap="viridis")


def test_plots_for_vectors_digits_and_text_write_pngs(tmp_path: Path) -> None:
    features = render.feature_attribution_plot(
        np.random.default_rng(0).normal(size=(30, 4)),
        ["x", "x_dot", "theta", "theta_dot"],
        tmp_path / "cartpole.png",
    )
    digits = render.image_grid_plot(
        torch.rand(5, 1, 8, 8),
        torch.randn(5, 1, 8, 8),
        [3, 1, 4, 1, 5],
        [3, 1, 4, 7, 5],
        tmp_path / "digits.png",
    )
    tokens = render.token_attribution_plot(
        ["this", "film", "was", "$5", "of", "pure", "joy"] * 4, np.linspace(-1, 1, 28), tmp_path / "text.png"
    )
    for path in (features, digits, tokens):
        assert path.stat().st_size > 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cartpole.png", "digits.png", "text.png"]
