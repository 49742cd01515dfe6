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
from .games import (
    TOKEN_GAME_MODES,
    LoupeGameModel,
    SemanticGame,
    TokenGame,
    region_phrase_interactions,
    region_phrase_targets,
    region_targets,
    semantic_game,
    semantic_game_from_logits,
    token_game,
    token_region_interactions,
)
from .instability import instability
from .protocol import Game, evaluate_coalitions

__all__ = [
    "EXACT_METHODS",
    "MAX_EXACT_PLAYERS",
    "SAMPLING_METHODS",
    "TOKEN_GAME_MODES",
    "CoalitionSample",
    "Game",
    "InteractionEstimate",
    "LoupeGameModel",
    "SemanticGame",
    "TokenGame",
    "all_coalition_values",
    "all_coalitions",
    "evaluate_coalitions",
    "exact_interactions",
    "exact_shapley_values",
    "instability",
    "interaction_terms",
    "region_phrase_interactions",
    "region_phrase_targets",
    "region_targets",
    "sample_coalitions",
    "sampled_interactions",
    "semantic_game",
    "semantic_game_from_logits",
    "token_game",
    "token_region_interactions",
]
