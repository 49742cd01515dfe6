"""The closed sets of values LOUPE's options take, and the checks that name a wrong value.

A module of its own, with no imports, so that the configuration, the model files that checkpoints
carry for `trust_remote_code`, and the model-agnostic Shapley engine can all read it.
"""

from __future__ import annotations

import math
from collections.abc import Collection

TOKEN_GAME_MODES = ("feature", "input")
REGION_BOX_MODES = ("anchors", "learned")
TSA_LABELS = ("magnitude_per_patch", "magnitude", "signed")
TEXT_POOLING_MODES = ("mean", "cls")
IMAGE_POOLING_MODES = ("mean", "max")
INTERACTION_NORMALIZATIONS = ("minmax", "sigmoid")
UNSIL_ARCHITECTURES = ("mlp_attention", "mlp_dot_attention", "conv1d", "transformer")
UNSIL_LEVELS = ("token", "semantic")
SAMPLING_METHODS = ("uniform", "antithetic", "stratified")
FSA_DIRECTIONS = ("region_to_phrase", "both")
FSA_REGION_WEIGHTINGS = ("uniform", "confidence")


def check_choice(name: str, value: object, choices: Collection[str]) -> None:
    """Raises a `ValueError` naming `name`, the wrong `value` and the allowed `choices`."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def check_number(
    name: str,
    value: object,
    *,
    integer: bool = False,
    minimum: float | None = None,
    maximum: float | None = None,
    above: float | None = None,
    below: float | None = None,
    optional: bool = False,
) -> None:
    """Raises a `TypeError` when `value` is not a (finite) number, or an integer when `integer`, and a
    `ValueError` when it falls outside the bounds (`minimum`/`maximum` inclusive, `above`/`below`
    exclusive); both name `name`, what was expected and what was given. `None` passes if `optional`."""
    if value is None and optional:
        return
    expected = "an integer" if integer else "a number"
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise TypeError(f"{name} must be {expected}, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    bounds = [
        (minimum, ">=", value >= minimum if minimum is not None else True),
        (maximum, "<=", value <= maximum if maximum is not None else True),
        (above, ">", value > above if above is not None else True),
        (below, "<", value < below if below is not None else True),
    ]
    wanted = [f"{sign} {bound}" for bound, sign, _ in bounds if bound is not None]
    if not all(ok for _, _, ok in bounds):
        raise ValueError(f"{name} must be {expected} {' and '.join(wanted)}, got {value!r}")


__all__ = [
    "IMAGE_POOLING_MODES",
    "INTERACTION_NORMALIZATIONS",
    "REGION_BOX_MODES",
    "SAMPLING_METHODS",
    "TEXT_POOLING_MODES",
    "TOKEN_GAME_MODES",
    "TSA_LABELS",
    "UNSIL_ARCHITECTURES",
    "UNSIL_LEVELS",
    "check_choice",
    "check_number",
]
