"""The closed sets of values LOUPE's options take, and the one check that names a wrong value.

A module of its own, with no imports, so that the configuration, the model files that checkpoints
carry for `trust_remote_code`, and the model-agnostic Shapley engine can all read it.
"""

from __future__ import annotations

from collections.abc import Collection

TOKEN_GAME_MODES = ("feature", "input")
REGION_BOX_MODES = ("anchors", "learned")
TSA_LABELS = ("magnitude_per_patch", "magnitude", "signed")
TEXT_POOLING_MODES = ("mean", "cls")
IMAGE_POOLING_MODES = ("mean", "max")
INTERACTION_NORMALIZATIONS = ("minmax", "sigmoid")
UNSIL_ARCHITECTURES = ("mlp_attention", "mlp_dot_attention", "conv1d", "transformer")
UNSIL_LEVELS = ("token", "semantic")


def check_choice(name: str, value: object, choices: Collection[str]) -> None:
    """Raises a `ValueError` naming `name`, the wrong `value` and the allowed `choices`."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


__all__ = [
    "IMAGE_POOLING_MODES",
    "INTERACTION_NORMALIZATIONS",
    "REGION_BOX_MODES",
    "TEXT_POOLING_MODES",
    "TOKEN_GAME_MODES",
    "TSA_LABELS",
    "UNSIL_ARCHITECTURES",
    "UNSIL_LEVELS",
    "check_choice",
]
