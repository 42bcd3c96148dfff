"""The token penalties as OpenAI ``logit_bias``, for engines that take a static bias (an upstream server), and
the rule that keeps a client's own ``logit_bias`` from undoing a penalty on any engine."""

from __future__ import annotations

from collections.abc import Mapping

from guard.methods.token_penalty.tables import TokenPenalties


def protected_tokens(penalties: TokenPenalties) -> frozenset[int]:
    """Every token some concept's penalties push down: a client may lower these further, never raise them."""
    tokens: set[int] = set()
    for concept in penalties.policy.concepts:
        if concept.methods.token_penalty.enabled:
            tokens.update(penalties.logit_bias([concept.id]))
    return frozenset(tokens)


def client_bias_within_guard(client_bias: Mapping[int, float], protected: frozenset[int]) -> dict[int, float]:
    """The client's logit_bias with every positive bias on a guard-penalised token removed."""
    return {token: (min(bias, 0.0) if token in protected else bias) for token, bias in client_bias.items()}


def merged_logit_bias(client_bias: Mapping[int, float], guard_bias: Mapping[int, float]) -> dict[int, float]:
    """One static bias for an upstream: the guard's value wins unless the client's is even lower."""
    merged = dict(client_bias)
    for token, bias in guard_bias.items():
        merged[token] = min(merged.get(token, bias), bias)
    return merged
