"""Shared torch network modules for supervised tasks and the DQN/PPO agents (pure torch, no Gymnasium).

Encoders take plain ints/tuples and expose ``out_dim``:

- vectors: ``MLP``;
- images (*, C, H, W), uint8 scaled by 1/255 inside ``forward``: ``NatureCNN``, ``ImpalaCNN``, ``ViTEncoder``;
- sequences (B, T, in_dim) or (B, T) tokens, with explicit batch-first state, reset and padding
  masks: ``LSTMEncoder``, ``GRUEncoder``, ``TransformerEncoder`` (see ``nets.sequence``).

Heads: ``LinearClassifier``, ``QHead`` (dueling option), ``ActorCriticHead``. Registry: ``build``,
``names``, ``describe``. ``nets.sb3_adapter.EncoderExtractor`` (imported on first access, since it
needs Gymnasium and SB3) makes any image/vector encoder a Stable-Baselines3 features extractor.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from nets.cnn import ImpalaCNN, NatureCNN
from nets.encoders import build_encoder
from nets.heads import ActorCriticHead, LinearClassifier, QHead
from nets.layers import layer_init
from nets.mlp import MLP
from nets.registry import build, describe, kind, names
from nets.rnn import GRUEncoder, LSTMEncoder
from nets.sequence import pool_sequence
from nets.transformer import TransformerEncoder
from nets.vit import ViTEncoder

__all__ = [
    "MLP",
    "ActorCriticHead",
    "GRUEncoder",
    "ImpalaCNN",
    "LSTMEncoder",
    "LinearClassifier",
    "NatureCNN",
    "QHead",
    "TransformerEncoder",
    "ViTEncoder",
    "build",
    "build_encoder",
    "describe",
    "kind",
    "layer_init",
    "names",
    "pool_sequence",
]


def __getattr__(name: str) -> ModuleType:
    # `nets.sb3_adapter` without an explicit import, while `import nets` stays free of Gymnasium/SB3.
    if name == "sb3_adapter":
        return importlib.import_module("nets.sb3_adapter")
    raise AttributeError(f"module 'nets' has no attribute '{name}'")
