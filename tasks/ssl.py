"""Self-supervised pre-training of the image encoders of nets/ (``lab fit ssl``), then how much the
features are worth: linear probes on the frozen encoder, fine-tuning with few labels, and the same
encoder trained from scratch on the same labels.

Methods (``method``):

* ``simclr`` (Chen et al. 2020): two augmented views of each image; the encoder and a projection
  MLP map both, and NT-Xent (:func:`nt_xent`) makes each view pick its twin out of the 2B - 1
  others. Views: small rotations, zooms (crops), sub-pixel shifts and noise on digits; pad-4 random
  shifts on Mario frames.
* ``mae`` (He et al. 2022), ViT only: 75% of the patches are hidden, the encoder sees the rest, and a
  one-block decoder reconstructs the hidden patches' pixels (:class:`MaskedAutoencoder`).
* ``atc`` (Stooke et al. 2021, Augmented Temporal Contrast), Mario only: a frame stack and the one
  ``atc_offset`` agent steps later in the same episode are positives; the anchor goes through the
  encoder, a linear compressor and a residual predictor, the positive through momentum copies of
  the encoder and compressor, and a bilinear product scores every anchor against every positive
  (InfoNCE). Both are randomly shifted (pad 4).

Data (``data``):

* ``digits``: scikit-learn's 8x8 digits, the training split of :mod:`tasks.digits` (its labels unused
  in pre-training). Afterwards, for each share in ``label_fractions`` (stratified, seeded): a linear
  probe (logistic regression on the frozen encoder's features), fine-tuning of encoder + head, and
  the same net trained from scratch with the ``lab fit digits`` recipe (shift augmentation).
* ``mario``: ``(4, 84, 84)`` frame stacks of several stages. ``frames=PATH`` reads a file written by
  ``python -m benchmarks.ssl_rl_experiment frames`` (random actions and the shipped agent, each frame
  labelled with the agent's greedy action); without it the task plays random actions itself (the
  task layer cannot load agents, ARCHITECTURE.md). Episodes are split into train and test. Linear
  probes predict the position bucket (``x_pos // 256``: which 256-pixel screen of the stage Mario is
  on) and, when the file has them, the expert's action, for the pre-trained encoder and for the
  same net at its random initialisation.

The encoder sits at ``model.encoder`` of every method, so ``lab train ... --set init_encoder=RUN``
takes it (``agents.ppo.load_encoder_tensors``). ``metrics.json`` (and ``--json``) holds the probe
accuracies under ``probes``; ``embeddings.png`` is a t-SNE (or PCA) picture of the test embeddings.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import nets
from core.compute import DEVICES, seed_everything, set_learner_threads
from core.config import option
from core.files import save_figure
from core.plots import pyplot
from nets.augment import SHIFT_PAD, gaussian_noise, random_affine, random_shift
from nets.layers import image_to_float
from nets.transformer import Block, init_transformer_weights
from nets.vit import ViTEncoder
from tasks.digits import load_split
from tasks.loop import TaskError, Tensors, fit, predict, write_metrics
from tasks.models import Classifier

NAME = "ssl"
DESCRIPTION = "self-supervised pre-training (SimCLR, MAE, ATC) of an image encoder, then linear probes"
NETS = ("nature", "impala", "vit")
METHODS = ("auto", "simclr", "mae", "atc")
SCREEN = 256  # pixels of one NES screen: the width of a position bucket
MAX_BUCKET = 15  # buckets beyond (x >= 3840) are pooled


@dataclass
class SSLConfig:
    """Settings of ``lab fit ssl``."""

    net: str = option("nature", "image encoder to pre-train", choices=NETS)
    data: str = option("digits", "digits (8x8 images) or mario (4x84x84 frame stacks)", choices=("digits", "mario"))  # fmt: skip
    method: str = option("auto", "auto (simclr on digits, atc on mario), simclr, mae (vit only), atc (mario only)", choices=METHODS)  # fmt: skip
    epochs: int = option(150, "passes over the training images", min=1, max=100_000)
    seed: int = option(0, "seed of the split, the label subsets, torch and numpy", min=0)
    lr: float = option(1e-3, "peak AdamW learning rate of pre-training", min=1e-6, max=10.0)
    batch_size: int = option(256, "images (anchors) per gradient step", min=2, max=100_000)
    weight_decay: float = option(1e-4, "AdamW weight decay", min=0.0, max=1.0)
    warmup: float = option(0.05, "share of all steps spent warming up the learning rate", min=0.0, max=0.5)
    schedule: str = option("cosine", "learning-rate schedule after warm-up", choices=("cosine", "constant"))
    # SimCLR's value for small batches; it beat 0.2 on a validation split of the digits' training images.
    temperature: float = option(0.5, "simclr, atc: temperature of the softmax over candidates", min=0.01, max=10.0)  # fmt: skip
    projection: int = option(128, "simclr: projection width; atc: code width", min=8, max=4096)
    mask_ratio: float = option(0.75, "mae: share of the patches hidden", min=0.05, max=0.95)
    atc_offset: int = option(3, "atc: the positive is this many agent steps after the anchor", min=1, max=64)
    atc_tau: float = option(0.01, "atc: momentum target update rate per step", min=0.0, max=1.0)
    frames: str | None = option(None, "mario: frames file (.npz) of benchmarks/ssl_rl_experiment.py; none: random play here")  # fmt: skip
    stages: tuple[str, ...] = option(("1-1", "1-2", "1-3"), "mario without frames: the stages played")
    random_steps: int = option(3000, "mario without frames: steps of 8 random-playing envs per stage", min=10)
    label_fractions: tuple[float, ...] = option((0.01, 0.1, 1.0), "digits: shares of the training labels for probes, fine-tuning and scratch", min=0.001, max=1.0)  # fmt: skip
    finetune_steps: int = option(600, "digits: gradient steps of fine-tuning and of training from scratch", min=1)  # fmt: skip
    test_fraction: float = option(0.2, "share held out (digits: images; mario: episodes)", min=0.05, max=0.9)
    plot: str = option("tsne", "picture of the test embeddings", choices=("tsne", "pca"))
    device: str = option("auto", "auto (CUDA when available), cpu or cuda", choices=DEVICES)
    threads: int = option(1, "CPU threads of torch (0: one per core)", min=0, max=1024)


# ---------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's normalised-temperature cross-entropy over a batch of pairs.

    With z = normalise([z1; z2]) (2B rows) and s_ij = z_i . z_j / t, each row i is scored against
    the 2B - 1 others and must pick its twin p(i) (i + B or i - B):

        L = -1/(2B) sum_i log( exp(s_i,p(i)) / sum_{k != i} exp(s_ik) ).

    Args:
        z1, z2: ``(B, D)`` projections of the two views; row i of each comes from the same image.
        temperature: t.

    Returns:
        The scalar loss.
    """
    batch = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)  # (2B, D)
    similarity = z @ z.T / temperature  # (2B, 2B)
    similarity.fill_diagonal_(float("-inf"))  # a view is not its own candidate
    twins = torch.cat([torch.arange(batch, 2 * batch), torch.arange(batch)]).to(z.device)
    return F.cross_entropy(similarity, twins)


def info_nce(logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of ``(B, B)`` anchor-by-positive scores whose diagonal holds the true pairs."""
    return F.cross_entropy(logits, torch.arange(logits.shape[0], device=logits.device))


# ---------------------------------------------------------------------------------------------
# Models: every one keeps the encoder at `.encoder`
# ---------------------------------------------------------------------------------------------


def projection_mlp(in_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, in_dim), nn.ReLU(), nn.Linear(in_dim, out_dim))


class SimCLR(nn.Module):
    """Encoder and projection MLP: ``(B, C, H, W) -> (B, projection)``; NT-Xent on the output."""

    def __init__(self, encoder: nn.Module, projection: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.projector = projection_mlp(encoder.out_dim, projection)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.projector(self.encoder(images))

    def loss(self, view1: torch.Tensor, view2: torch.Tensor, temperature: float) -> torch.Tensor:
        z = self(torch.cat([view1, view2]))  # one pass over both views: (2B, projection)
        return nt_xent(z[: view1.shape[0]], z[view1.shape[0] :], temperature)


class ATC(nn.Module):
    """Augmented Temporal Contrast: anchors through encoder -> compressor -> residual predictor,
    positives through momentum copies of encoder and compressor, scored by a bilinear product."""

    def __init__(self, encoder: nn.Module, code: int, tau: float) -> None:
        super().__init__()
        self.encoder = encoder
        self.compressor = nn.Linear(encoder.out_dim, code)
        self.predictor = projection_mlp(code, code)
        self.bilinear = nn.Parameter(torch.eye(code))
        self.target_encoder = copy.deepcopy(encoder).requires_grad_(False)
        self.target_compressor = copy.deepcopy(self.compressor).requires_grad_(False)
        self.tau = tau

    @torch.no_grad()
    def update_target(self) -> None:
        """theta' <- (1 - tau) theta' + tau theta, once per gradient step."""
        for online, target in (
            (self.encoder, self.target_encoder),
            (self.compressor, self.target_compressor),
        ):
            for param, target_param in zip(online.parameters(), target.parameters(), strict=True):
                target_param.lerp_(param, self.tau)

    def loss(self, anchors: torch.Tensor, positives: torch.Tensor, temperature: float) -> torch.Tensor:
        """InfoNCE over the batch: every anchor against every positive, ``(B, ...)`` each."""
        code = self.compressor(self.encoder(anchors))  # (B, code)
        code = code + self.predictor(code)
        with torch.no_grad():
            target = self.target_compressor(self.target_encoder(positives))  # (B, code)
        logits = code @ self.bilinear @ target.T / temperature  # (B, B)
        return info_nce(logits - logits.max(dim=1, keepdim=True).values.detach())


class MaskedAutoencoder(nn.Module):
    """MAE on :class:`nets.vit.ViTEncoder`: the encoder's own patch embedding, positions, blocks and
    norm see only the kept patches (plus [CLS]); a narrow decoder fills in mask tokens and predicts
    every patch's pixels; the loss is the squared error on the hidden patches."""

    def __init__(self, encoder: ViTEncoder, mask_ratio: float, decoder_dim: int = 64, heads: int = 4) -> None:
        super().__init__()
        self.encoder = encoder
        self.mask_ratio = mask_ratio
        patches = encoder.grid[0] * encoder.grid[1]
        dim = encoder.pos_embed.shape[-1]
        self.decoder_embed = nn.Linear(dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_pos = nn.Parameter(torch.randn(1, patches, decoder_dim) * 0.02)
        self.decoder = Block(decoder_dim, heads)
        self.decoder.apply(init_transformer_weights)
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        self.predict = nn.Linear(decoder_dim, encoder.in_shape[0] * encoder.patch_size**2)

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """``(N, C, H', W')`` padded images -> ``(N, P, C * patch * patch)`` in the embedding's order."""
        size = self.encoder.patch_size
        patches = F.unfold(images, kernel_size=size, stride=size)  # (N, C * size * size, P)
        return patches.transpose(1, 2)

    def loss(self, images: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Args: images ``(N, C, H, W)``; noise ``(N, P)`` uniform: the lowest ``(1 - ratio) P`` kept."""
        vit = self.encoder
        x = F.pad(image_to_float(images), vit.padding)  # (N, C, H', W')
        tokens = vit.patch_embed(x).flatten(2).transpose(1, 2) + vit.pos_embed[:, 1:]  # (N, P, dim)
        batch, patches, dim = tokens.shape
        keep = max(1, round(patches * (1 - self.mask_ratio)))
        kept = noise.argsort(dim=1)[:, :keep]  # (N, keep)
        visible = tokens.gather(1, kept[..., None].expand(-1, -1, dim))  # (N, keep, dim)
        cls = (vit.cls_token + vit.pos_embed[:, :1]).expand(batch, -1, -1)
        encoded = vit.ln_f(vit.blocks(torch.cat([cls, visible], dim=1)))  # (N, 1 + keep, dim)
        decoded = self.decoder_embed(encoded[:, 1:])  # (N, keep, d)
        full = self.mask_token.expand(batch, patches, -1).clone()
        full = full.scatter(1, kept[..., None].expand(-1, -1, full.shape[-1]), decoded) + self.decoder_pos
        prediction = self.predict(self.decoder_norm(self.decoder(full)))  # (N, P, C * patch^2)
        hidden = torch.ones(batch, patches, device=x.device).scatter(1, kept, 0.0)  # 1 on hidden patches
        error = ((prediction - self.patchify(x)) ** 2).mean(dim=-1)  # (N, P)
        return (error * hidden).sum() / hidden.sum()


def build_encoder(config: SSLConfig, in_shape: tuple[int, int, int]) -> nn.Module:
    """The net as an agent builds it (``nets.build_encoder`` defaults), so ``init_encoder`` fits."""
    return nets.build_encoder(config.net, in_shape, (), activation="relu")


def resolve_method(config: SSLConfig) -> str:
    """The method to run; TaskError naming the valid ones for a pair that does not go together."""
    method = config.method
    if method == "auto":
        return "atc" if config.data == "mario" else "simclr"
    if method == "mae" and config.net != "vit":
        raise TaskError(
            f"method=mae reconstructs ViT patches; use net=vit, or method=simclr with net={config.net}"
        )
    if method == "atc" and config.data != "mario":
        raise TaskError(
            "method=atc contrasts frames of one episode; use data=mario, or method=simclr/mae on digits"
        )
    return method


# ---------------------------------------------------------------------------------------------
# Views
# ---------------------------------------------------------------------------------------------


def digit_view(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One random view of ``(B, 1, 8, 8)`` uint8 digits: rotation within 12 degrees, zoom 0.9-1.2
    (a crop when above 1), a shift within 1 pixel, then Gaussian noise; float in [0, 1]."""
    view = random_affine(
        image_to_float(images), generator, max_degrees=12.0, scale=(0.9, 1.2), max_translate=1.0
    )
    return gaussian_noise(view, 0.05, generator)


def view_fn(data: str) -> Callable[[torch.Tensor, torch.Generator], torch.Tensor]:
    """The augmentation of pre-training: digit jitter, or pad-4 random shifts of Mario stacks."""
    if data == "digits":
        return digit_view
    return lambda frames, generator: random_shift(frames, SHIFT_PAD, generator)


# ---------------------------------------------------------------------------------------------
# Mario frames
# ---------------------------------------------------------------------------------------------


@dataclass
class FrameSet:
    """Frame stacks in episode order, with what the probes predict.

    Attributes:
        frames: ``(N, 4, 84, 84)`` uint8.
        x_pos: ``(N,)`` Mario's x in the stage when the stack was observed.
        episode: ``(N,)`` episode id (unique in the set).
        step: ``(N,)`` agent step within the episode.
        stage: ``(N,)`` index into ``stage_names``.
        expert_action: ``(N,)`` the expert's greedy action on the stack, -1 where unknown.
        stage_names: e.g. ``("1-1", "1-2")``.
    """

    frames: np.ndarray
    x_pos: np.ndarray
    episode: np.ndarray
    step: np.ndarray
    stage: np.ndarray
    expert_action: np.ndarray
    stage_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.frames)

    def sorted(self) -> FrameSet:
        order = np.lexsort((self.step, self.episode))
        fields = {name: getattr(self, name)[order] for name in FRAME_FIELDS}
        return FrameSet(**fields, stage_names=self.stage_names)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {name: getattr(self, name) for name in FRAME_FIELDS}
        np.savez_compressed(path, **arrays, stage_names=np.array(self.stage_names))

    @classmethod
    def load(cls, path: str | Path) -> FrameSet:
        """Reads a frames file; TaskError (one line) when it is missing or not one."""
        try:
            with np.load(path) as data:
                fields = {name: data[name] for name in FRAME_FIELDS}
                names = tuple(str(name) for name in data["stage_names"])
        except (OSError, KeyError, ValueError) as error:
            raise TaskError(f"frames={path} is not a frames file ({error}); write one with "
                            "python -m benchmarks.ssl_rl_experiment frames") from None  # fmt: skip
        return cls(**fields, stage_names=names).sorted()

    @classmethod
    def concat(cls, parts: Sequence[FrameSet]) -> FrameSet:
        """One set from several (episode ids renumbered, stage names merged)."""
        names = tuple(dict.fromkeys(name for part in parts for name in part.stage_names))
        fields: dict[str, list[np.ndarray]] = {name: [] for name in FRAME_FIELDS}
        offset = 0
        for part in parts:
            for name in FRAME_FIELDS:
                fields[name].append(getattr(part, name))
            fields["episode"][-1] = part.episode + offset
            fields["stage"][-1] = np.array([names.index(part.stage_names[s]) for s in part.stage], np.int16)
            offset += int(part.episode.max()) + 1 if len(part) else 0
        return cls(**{k: np.concatenate(v) for k, v in fields.items()}, stage_names=names).sorted()


FRAME_FIELDS = ("frames", "x_pos", "episode", "step", "stage", "expert_action")


def gather_frames(
    stages: Sequence[str],
    steps: int,
    seed: int,
    policy: Callable[[np.ndarray], np.ndarray] | None = None,
    epsilons: Sequence[float] = (1.0,),
    num_envs: int = 8,
    stall_patience: int = 100,
) -> FrameSet:
    """Plays ``steps`` agent steps of each stage and keeps every observed frame stack.

    Env i of each stage acts randomly with probability ``epsilons[i % len(epsilons)]`` and else
    takes ``policy``'s action; ``policy`` (a greedy agent, given by a caller above the task layer)
    also labels every stack with its action. An episode that makes no progress for
    ``stall_patience`` steps is cut, so a random player stuck at a pipe does not fill the set with
    one picture.

    Args:
        stages: e.g. ``("1-1", "1-2")``.
        steps: vector steps per stage (``steps * num_envs`` stacks).
        seed: seed of the envs and of the random actions.
        policy: ``(B, 4, 84, 84) uint8 -> (B,)`` actions; None: random play, no expert labels.
        epsilons: per-env share of random actions.
        num_envs: envs per stage, stepped in this process.
        stall_patience: agent steps without a new furthest x before an episode is cut (0: never).

    Returns:
        The frames, sorted by episode and step.
    """
    import envs

    rng = np.random.default_rng(seed)
    parts = []
    next_episode = 0
    for stage in stages:
        vec_env = envs.make_vec(
            f"mario-{stage}", num_envs, seed=seed, backend="sync", stall_patience=stall_patience
        )
        # Without a policy every action is random.
        epsilon = np.array([epsilons[i % len(epsilons)] if policy else 1.0 for i in range(num_envs)])
        episode = np.arange(next_episode, next_episode + num_envs)
        next_episode += num_envs
        step = np.zeros(num_envs, dtype=np.int32)
        rows: dict[str, list[np.ndarray]] = {name: [] for name in FRAME_FIELDS}
        try:
            obs, info = vec_env.reset(seed=seed)
            num_actions = int(vec_env.single_action_space.n)
            for _ in range(steps):
                expert = policy(obs) if policy is not None else np.full(num_envs, -1)
                random_actions = rng.integers(0, num_actions, num_envs)
                actions = np.where(rng.random(num_envs) < epsilon, random_actions, np.maximum(expert, 0))
                for name, value in (("frames", obs), ("x_pos", info["x_pos"]), ("episode", episode),
                                    ("step", step), ("expert_action", expert)):  # fmt: skip
                    rows[name].append(np.array(value))
                obs, _, terminations, truncations, info = vec_env.step(actions)
                done = terminations | truncations
                step = np.where(done, 0, step + 1)
                fresh = np.flatnonzero(done)
                episode = episode.copy()
                episode[fresh] = np.arange(next_episode, next_episode + fresh.size)
                next_episode += fresh.size
        finally:
            vec_env.close()
        part = {name: np.concatenate(rows[name]) for name in rows if name != "stage"}
        parts.append(
            FrameSet(
                frames=part["frames"].astype(np.uint8),
                x_pos=part["x_pos"].astype(np.int32),
                episode=part["episode"].astype(np.int32),
                step=part["step"].astype(np.int32),
                stage=np.zeros(len(part["frames"]), np.int16),
                expert_action=part["expert_action"].astype(np.int16),
                stage_names=(stage,),
            )
        )
    return FrameSet.concat(parts)


def position_bucket(x_pos: np.ndarray) -> np.ndarray:
    """Which 256-pixel screen of the stage Mario is on, pooled beyond ``MAX_BUCKET``."""
    return np.minimum(x_pos // SCREEN, MAX_BUCKET).astype(np.int64)


def split_episodes(frame_set: FrameSet, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks ``(train, test)`` of the frames: whole episodes go to one side, so a test frame
    never has its near-twin (the next step) in training."""
    rng = np.random.default_rng(seed)
    episodes = rng.permutation(np.unique(frame_set.episode))
    sizes = np.array([(frame_set.episode == e).sum() for e in episodes])
    test_episodes = episodes[np.cumsum(sizes) <= test_fraction * len(frame_set)]
    test = np.isin(frame_set.episode, test_episodes)
    return ~test, test


def positive_index(frame_set: FrameSet, offset: int) -> np.ndarray:
    """For each frame, the index of the frame ``offset`` steps later in its episode, -1 if none
    (the set is sorted by episode and step)."""
    later = np.arange(len(frame_set)) + offset
    inside = later < len(frame_set)
    later = np.where(inside, later, 0)
    same = (frame_set.episode[later] == frame_set.episode) & (
        frame_set.step[later] == frame_set.step + offset
    )
    return np.where(inside & same, later, -1)


# ---------------------------------------------------------------------------------------------
# Probes
# ---------------------------------------------------------------------------------------------


def features(encoder: nn.Module, images: torch.Tensor) -> np.ndarray:
    """The frozen encoder's features ``(N, D)`` of ``(N, C, H, W)`` images, in eval mode."""
    return predict(encoder, (images,), batch_size=512).numpy()


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> float:
    """Test accuracy of a logistic regression on standardised features (L2, C = 1, no tuning)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    if len(np.unique(train_y)) < 2:
        return float(np.mean(test_y == train_y[0]))
    scaler = StandardScaler().fit(train_x)
    probe = LogisticRegression(max_iter=2000, C=1.0)
    probe.fit(scaler.transform(train_x), train_y)
    return float(probe.score(scaler.transform(test_x), test_y))


def label_subset(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Indices of a stratified ``fraction`` of the labelled examples, at least one per class."""
    from sklearn.model_selection import train_test_split

    n = len(labels)
    classes = int(labels.unique().numel())
    size = max(classes, round(fraction * n))
    if size >= n:
        return torch.arange(n)
    index, _ = train_test_split(np.arange(n), train_size=size, stratify=labels.numpy(), random_state=seed)
    return torch.as_tensor(np.sort(index))


def train_classifier(
    encoder: nn.Module, images: torch.Tensor, labels: torch.Tensor, steps: int, seed: int
) -> Classifier:
    """Encoder plus a linear head trained on ``(images, labels)`` with ``lab fit digits``'s recipe:
    AdamW (lr 3e-3, weight decay 1e-4), 5% warm-up then cosine, batches of 64, shifts within 1 pixel."""
    torch.manual_seed(seed)
    model = Classifier(encoder, num_classes=10).to(next(encoder.parameters()).device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup))),
    )  # fmt: skip
    generator = torch.Generator().manual_seed(seed)
    batch = min(64, len(labels))
    device = next(model.parameters()).device
    model.train()
    for _ in range(steps):
        index = torch.randint(0, len(labels), (batch,), generator=generator)
        x = random_shift(images[index], 1, generator).to(device)
        loss = F.cross_entropy(model(x), labels[index].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval()


def digits_probes(
    encoder: nn.Module, config: SSLConfig, train: Tensors, test: Tensors
) -> dict[str, dict[str, float]]:
    """For each label share: linear probe (frozen pre-trained encoder), fine-tuning, scratch, and a
    linear probe of the untrained net (what the architecture alone gives)."""
    train_x, train_y = train
    test_x, test_y = test
    torch.manual_seed(config.seed)
    untrained = build_encoder(config, tuple(train_x.shape[1:])).to(next(encoder.parameters()).device)
    pretrained_train, pretrained_test = features(encoder, train_x), features(encoder, test_x)
    untrained_train, untrained_test = features(untrained, train_x), features(untrained, test_x)

    def accuracy(model: nn.Module) -> float:
        return float((predict(model, (test_x,)).argmax(-1) == test_y).float().mean())

    results = {}
    for fraction in config.label_fractions:
        index = label_subset(train_y, fraction, config.seed)
        y = train_y[index].numpy()
        torch.manual_seed(config.seed)
        scratch_encoder = build_encoder(config, tuple(train_x.shape[1:])).to(
            next(encoder.parameters()).device
        )
        results[f"{fraction * 100:g}%"] = {
            "labels": len(index),
            "linear_probe": linear_probe(pretrained_train[index], y, pretrained_test, test_y.numpy()),
            "untrained_probe": linear_probe(untrained_train[index], y, untrained_test, test_y.numpy()),
            "fine_tune": accuracy(train_classifier(copy.deepcopy(encoder), train_x[index], train_y[index],
                                                   config.finetune_steps, config.seed)),
            "scratch": accuracy(train_classifier(scratch_encoder, train_x[index], train_y[index],
                                                 config.finetune_steps, config.seed)),
        }  # fmt: skip
    return results


def mario_probes(
    encoder: nn.Module, untrained: nn.Module, frame_set: FrameSet, train: np.ndarray, test: np.ndarray
) -> dict[str, dict[str, float]]:
    """Linear probes of the position bucket and (when known) the expert's action, for the
    pre-trained and the untrained encoder, with the majority-class share as the floor."""
    frames = torch.from_numpy(frame_set.frames)
    pretrained, random_init = features(encoder, frames), features(untrained, frames)
    targets = {"position_bucket": position_bucket(frame_set.x_pos)}
    if (frame_set.expert_action >= 0).all():
        targets["expert_action"] = frame_set.expert_action.astype(np.int64)
    results = {}
    for name, y in targets.items():
        majority = np.bincount(y[train]).argmax()
        results[name] = {
            "pretrained": linear_probe(pretrained[train], y[train], pretrained[test], y[test]),
            "random_init": linear_probe(random_init[train], y[train], random_init[test], y[test]),
            "majority": float(np.mean(y[test] == majority)),
            "classes": int(len(np.unique(y))),
        }
    return results


def knn_accuracy(encoder: nn.Module, reference: Tensors, queries: Tensors) -> float:
    """Share of ``queries`` whose nearest ``reference`` image (cosine of features) has their label."""
    ref = F.normalize(torch.from_numpy(features(encoder, reference[0])), dim=1)
    query = F.normalize(torch.from_numpy(features(encoder, queries[0])), dim=1)
    nearest = (query @ ref.T).argmax(dim=1)
    return float((reference[1][nearest] == queries[1]).float().mean())


def plot_embeddings(
    encoder: nn.Module,
    images: torch.Tensor,
    labels: np.ndarray,
    path: Path,
    how: str,
    title: str,
    legend: str,
) -> Path:
    """A 2-D map (t-SNE or PCA) of the encoder's features, one colour per label."""
    plt = pyplot()
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    x = features(encoder, images)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    if how == "tsne":
        points = TSNE(2, init="pca", perplexity=min(30.0, (len(x) - 1) / 3), random_state=0).fit_transform(x)
    else:
        points = PCA(2, random_state=0).fit_transform(x)
    fig, ax = plt.subplots(figsize=(5.5, 4.8), dpi=100)
    scatter = ax.scatter(
        points[:, 0], points[:, 1], c=labels, cmap="tab10" if labels.max() < 10 else "viridis", s=7
    )
    fig.colorbar(scatter, ax=ax, label=legend)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# The task
# ---------------------------------------------------------------------------------------------


def run(config: SSLConfig, run_dir: Path, progress: bool = True, resume: bool = False) -> dict[str, Any]:
    """Pre-trains the encoder through the shared fit loop, then probes it.

    Args:
        config: the task settings.
        run_dir: existing directory receiving the outputs.
        progress: show a progress bar.
        resume: continue the pre-training in ``run_dir`` from its newest epoch checkpoint.

    Returns:
        The metrics dict written to ``run_dir/metrics.json``, with ``probes``.
    """
    method = resolve_method(config)
    set_learner_threads(config.threads)
    seed_everything(config.seed)
    if config.data == "digits":
        return run_digits(config, method, Path(run_dir), progress, resume)
    return run_mario(config, method, Path(run_dir), progress, resume)


def build_model(config: SSLConfig, method: str, in_shape: tuple[int, int, int]) -> nn.Module:
    encoder = build_encoder(config, in_shape)
    if method == "mae":
        return MaskedAutoencoder(encoder, config.mask_ratio)
    if method == "atc":
        return ATC(encoder, config.projection, config.atc_tau)
    return SimCLR(encoder, config.projection)


def pretraining_steps(
    model: nn.Module,
    method: str,
    config: SSLConfig,
    frames: torch.Tensor | None = None,
    positives: torch.Tensor | None = None,
) -> tuple[Callable, Callable]:
    """``(augment, loss_fn)`` for the fit loop. Batches are ``(images, labels)`` (digits) or
    ``(frame indices, labels)`` into ``frames`` (Mario: the stacks stay in one tensor, and atc's
    positive of frame i is ``frames[positives[i]]``); ``augment`` turns them into two views (or MAE's
    images and mask noise), ``loss_fn`` those into the loss."""
    views = view_fn("digits" if frames is None else "mario")

    def augment(batch: Tensors, generator: torch.Generator) -> Tensors:
        first, labels = batch
        images = first if frames is None else frames[first]
        if method == "simclr":
            return views(images, generator), views(images, generator), labels
        if method == "mae":
            patches = model.encoder.grid[0] * model.encoder.grid[1]
            return images, torch.rand((len(images), patches), generator=generator), labels
        assert frames is not None and positives is not None
        return views(images, generator), views(frames[positives[first]], generator), labels

    def loss_fn(m: nn.Module, batch: Tensors) -> torch.Tensor:
        if method == "mae":
            return m.loss(batch[0], batch[1])
        if method == "atc":
            m.update_target()
        return m.loss(batch[0], batch[1], config.temperature)

    return augment, loss_fn


def run_digits(config: SSLConfig, method: str, run_dir: Path, progress: bool, resume: bool) -> dict[str, Any]:
    train, test = load_split(config.test_fraction, config.seed)
    model = build_model(config, method, (1, 8, 8))
    augment, loss_fn = pretraining_steps(model, method, config)
    result = fit(
        task=NAME, config=config, model=model, train=train, test=test, run_dir=run_dir, progress=progress,
        metric="knn_accuracy", evaluate=lambda m, split: {"knn_accuracy": knn_accuracy(m.encoder, train, split)},
        loss_fn=loss_fn, augment=augment, resume=resume,
        extra_metrics={"method": method, "data": "digits"},
    )  # fmt: skip
    encoder = result.model.encoder
    metrics = result.metrics
    metrics["probes"] = digits_probes(encoder, config, train, test)
    plot_embeddings(
        encoder, test[0], test[1].numpy(), run_dir / "embeddings.png", config.plot,
        f"digits test images, {config.net} after {method} ({config.plot})", "digit",
    )  # fmt: skip
    write_metrics(run_dir, metrics)
    return metrics


def run_mario(config: SSLConfig, method: str, run_dir: Path, progress: bool, resume: bool) -> dict[str, Any]:
    if config.frames:
        frame_set = FrameSet.load(config.frames)
    else:
        frame_set = gather_frames(config.stages, config.random_steps, config.seed)
    train_mask, test_mask = split_episodes(frame_set, config.test_fraction, config.seed)
    frames = torch.from_numpy(frame_set.frames)
    buckets = torch.from_numpy(position_bucket(frame_set.x_pos))
    positives = torch.from_numpy(positive_index(frame_set, config.atc_offset))
    # atc: every training frame with a later frame of its episode is an anchor; simclr: every one.
    anchors = np.flatnonzero(train_mask & ((positives >= 0).numpy() | (method != "atc")))
    train = (torch.from_numpy(anchors), buckets[anchors])
    if len(anchors) < 2:
        raise TaskError(f"only {len(anchors)} training frames; gather more (random_steps or a frames file)")
    # The per-epoch check: 1-NN position buckets of (at most) 1000 test stacks against 2000 training ones.
    rng = np.random.default_rng(config.seed)
    reference = rng.permutation(np.flatnonzero(train_mask))[:2000]
    queries = rng.permutation(np.flatnonzero(test_mask))[:1000]
    test = (frames[queries], buckets[queries])
    model = build_model(config, method, tuple(frames.shape[1:]))
    untrained = copy.deepcopy(model.encoder)
    augment, loss_fn = pretraining_steps(model, method, config, frames, positives)
    result = fit(
        task=NAME, config=config, model=model, train=train, test=test, run_dir=run_dir, progress=progress,
        metric="knn_accuracy",
        evaluate=lambda m, split: {"knn_accuracy": knn_accuracy(m.encoder, (frames[reference], buckets[reference]), split)},
        loss_fn=loss_fn, augment=augment, resume=resume,
        extra_metrics={"method": method, "data": "mario", "frames": len(frame_set),
                       "train_frames": int(train_mask.sum()), "test_frames": int(test_mask.sum()),
                       "stages": list(frame_set.stage_names)},
    )  # fmt: skip
    metrics = result.metrics
    metrics["probes"] = mario_probes(result.model.encoder, untrained, frame_set, train_mask, test_mask)
    shown = rng.permutation(np.flatnonzero(test_mask))[:1500]
    plot_embeddings(
        result.model.encoder, frames[shown], buckets[shown].numpy(), run_dir / "embeddings.png", config.plot,
        f"Mario test frames, {config.net} after {method} ({config.plot})", f"position bucket (x // {SCREEN})",
    )  # fmt: skip
    write_metrics(run_dir, metrics)
    return metrics
