"""The Shapley interaction engine: exact and sampled coalition interactions of batched games.

A game is a callable `game(masks: bool [*batch, G, n]) -> values [*batch, G]` (`protocol.py`).
Exact enumeration and sampling share one interface, so either can produce LOUPE's interaction
labels (METHOD §3.2-3.4) and each can check the other:

>>> exact = exact_interactions(game, n, targets)                  # [*batch, T]
>>> estimate = sampled_interactions(game, n, targets, 100, generator=g)
>>> estimate.values, estimate.stderr                               # [*batch, T] each
"""

from .coalitions import (
    MAX_EXACT_PLAYERS,
    SAMPLING_METHODS,
    CoalitionSample,
    all_coalitions,
    sample_coalitions,
)
from .estimators import (
    EXACT_METHODS,
    InteractionEstimate,
    all_coalition_values,
    exact_interactions,
    exact_shapley_values,
    interaction_terms,
    sampled_interactions,
)
from .instability import instability
from .protocol import Game, evaluate_coalitions
from .semantic_game import (
    SemanticGame,
    region_phrase_interactions,
    region_phrase_targets,
    semantic_game,
    semantic_game_from_logits,
)
from .targets import game_interactions, selected_images_interactions, selected_interactions
from .token_game import (
    TOKEN_GAME_MODES,
    InputTokenGame,
    LoupeGameModel,
    MaxPooledTokenGame,
    MeanPooledTokenGame,
    TokenGame,
    region_targets,
    token_game,
    token_region_interactions,
)

__all__ = [
    "EXACT_METHODS",
    "MAX_EXACT_PLAYERS",
    "SAMPLING_METHODS",
    "TOKEN_GAME_MODES",
    "CoalitionSample",
    "Game",
    "InputTokenGame",
    "InteractionEstimate",
    "LoupeGameModel",
    "MaxPooledTokenGame",
    "MeanPooledTokenGame",
    "SemanticGame",
    "TokenGame",
    "all_coalition_values",
    "all_coalitions",
    "evaluate_coalitions",
    "exact_interactions",
    "exact_shapley_values",
    "game_interactions",
    "instability",
    "interaction_terms",
    "region_phrase_interactions",
    "region_phrase_targets",
    "region_targets",
    "sample_coalitions",
    "sampled_interactions",
    "selected_images_interactions",
    "selected_interactions",
    "semantic_game",
    "semantic_game_from_logits",
    "token_game",
    "token_region_interactions",
]
