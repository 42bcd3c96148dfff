"""Token penalties on the real SmolLM2 tokenizer and the default policy.

The hard block must hold for *every* way the model can spell an alias, not only the tokenizer's
canonical tokenization, so these tests walk many segmentations of the alias text through the
engine-neutral per-row core and check exactly where the block lands.
"""

from __future__ import annotations

import math
import random
import re
from pathlib import Path

import pytest
import torch

from detectors.terms import distinctive_prefix, is_distinctive
from guard.decision import Guard
from guard.errors import TokenPenaltyError
from guard.methods.token_penalty.tables import (
    MIN_PARTIAL_BLOCK,
    OPENAI_BIAS_LIMIT,
    OPENAI_MAX_BIAS_ENTRIES,
    PenaltyRow,
    TokenPenalties,
)
from guard.methods.token_penalty.transformers import TokenPenaltyProcessor
from guard.models import cache_dir, load_language_model
from guard.policy import load_policy

ROOT = Path(__file__).resolve().parents[1]
POLICY = ROOT / "policies" / "default.yaml"
CONCEPT = "harry-potter"


@pytest.fixture(scope="module")
def tokenizer():
    return load_language_model("embedded:smollm2")[1]


@pytest.fixture(scope="module")
def guard() -> Guard:
    return Guard.from_file(POLICY)


@pytest.fixture(scope="module")
def penalties(guard: Guard, tokenizer) -> TokenPenalties:
    return guard.token_penalties(tokenizer)


def _segmentations(text: str, vocab: dict[str, int], rng: random.Random, count: int) -> list[list[int]]:
    """Random ways to write ``text`` as a sequence of vocabulary tokens (any split the vocabulary allows)."""
    results = []
    for _ in range(count * 20):
        ids, position = [], 0
        while position < len(text):
            options = [end for end in range(position + 1, len(text) + 1) if text[position:end] in vocab]
            if not options:
                break
            end = rng.choice(options)
            ids.append(vocab[text[position:end]])
            position = end
        if position == len(text) and ids not in results:
            results.append(ids)
        if len(results) == count:
            break
    return results


def _blocked_after(penalties: TokenPenalties, concept_ids: tuple[str, ...], prefix: list[int]) -> set[int]:
    row = penalties.row(PenaltyRow(concept_ids))
    row.observe(prefix)
    return {int(t) for group in row.blocked_ids() for t in group.tolist()}


def _text_vocab(penalties: TokenPenalties) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for token_id, text in enumerate(penalties.texts):
        if token_id not in penalties.special_ids and text:
            vocab.setdefault(text, token_id)
    return vocab


@pytest.fixture(scope="module")
def exact(guard: Guard, tokenizer) -> TokenPenalties:
    """Penalties that block only the token completing an alias (block_ratio 1)."""
    policy = load_policy(POLICY)
    for concept in policy.concepts:
        concept.methods.token_penalty.block_ratio = 1.0
    return TokenPenalties(policy, tokenizer, guard.classifier.encoder, show_progress=False)


def _first_blocked_step(penalties: TokenPenalties, ids: list[int], spelling: str, ratio: float) -> int:
    """Index of the token that first brings the text to the blocked share of the alias (the whole of it at 1)."""
    name = spelling.strip()
    reach = max(math.ceil(ratio * len(name)), min(len(name), MIN_PARTIAL_BLOCK))
    # With partial blocking, a name whose first word is rare stops at its distinctive prefix ("hogw", "dumbl").
    first = re.match(r"[^\W_]+", name).group(0)
    rare = first == name or is_distinctive(first, name_part=True)
    prefix = distinctive_prefix(name.lower()) if ratio < 1 and rare else None
    reach = min(reach, prefix or reach)
    needed = len(spelling) - len(spelling.lstrip()) + reach
    written = 0
    for step, token_id in enumerate(ids):
        written += len(penalties.texts[token_id])
        if written >= needed:
            return step
    raise AssertionError("segmentation shorter than its spelling")


@pytest.mark.parametrize("spelling", [" Harry Potter", "Harry Potter", "harry potter", "HARRY POTTER", "HarryPotter",
                                      " Hogwarts", "Hogwarts", " HOGWARTS", " Dumbledore", " J.K. Rowling",
                                      " Sorcerer’s Stone"])
@pytest.mark.parametrize("ratio", [1.0, 0.75])
def test_every_tokenization_is_blocked_exactly_where_the_ratio_says(penalties: TokenPenalties, exact: TokenPenalties,
                                                                    tokenizer, spelling: str, ratio: float) -> None:
    table = exact if ratio == 1.0 else penalties
    assert table.policy.concept(CONCEPT).methods.token_penalty.block_ratio == ratio
    vocab = _text_vocab(table)
    segmentations = _segmentations(spelling, vocab, random.Random(spelling), count=12)
    canonical = tokenizer.encode(spelling, add_special_tokens=False)
    assert canonical in segmentations or len(segmentations) == 12
    for ids in [canonical, *segmentations]:
        blocked_step = _first_blocked_step(table, ids, spelling, ratio)
        for step in range(blocked_step):
            assert ids[step] not in _blocked_after(table, (CONCEPT,), ids[:step]), (
                f"{[table.texts[i] for i in ids]}: blocked too early at step {step}")
        assert ids[blocked_step] in _blocked_after(table, (CONCEPT,), ids[:blocked_step]), (
            f"{[table.texts[i] for i in ids]}: token {blocked_step} was not blocked")


def test_aliases_are_blocked_after_any_separator_but_not_inside_words(penalties: TokenPenalties, tokenizer) -> None:
    potter = tokenizer.encode(" Potter", add_special_tokens=False)
    for context in ["He said: Harry", "(Harry", "\"Harry", "Harry", "The book.\nHarry"]:
        ids = tokenizer.encode(context, add_special_tokens=False)
        assert set(potter) <= _blocked_after(penalties, (CONCEPT,), ids), context
    # "Sharry Potter" does not name the concept; the alias must start a word.
    ids = tokenizer.encode("Sharry", add_special_tokens=False)
    assert not set(potter) & _blocked_after(penalties, (CONCEPT,), ids)


@pytest.mark.parametrize("separator", [" ", "-", "_", ".", "\n", "\t", "  "])
def test_alias_words_are_blocked_across_every_separator(penalties: TokenPenalties, tokenizer, separator: str) -> None:
    """"Harry_Potter", "Harry\nPotter", "Harry  Potter" name the concept as surely as "Harry Potter"."""
    for alias in ("Harry{}Potter", "Severus{}Snape", "Ron{}Weasley"):
        ids = tokenizer.encode("Answer: " + alias.format(separator), add_special_tokens=False)
        row = penalties.row(PenaltyRow((CONCEPT,)))
        blocked_at = None
        for step, token_id in enumerate(ids):
            row.observe(ids[:step])
            if token_id in {int(t) for group in row.blocked_ids() for t in group.tolist()}:
                blocked_at = step
                break
        assert blocked_at is not None, f"{alias.format(separator)!r} was written unblocked"
        assert tokenizer.decode(ids[:blocked_at]).startswith("Answer: " + alias.format(separator)[:3])


def test_ordinary_text_is_never_blocked(penalties: TokenPenalties, tokenizer) -> None:
    text = ("The capital of France is Paris. Potters make pottery; Harold wrote a story about a wizard, "
            "a harbour and a stone bridge in the hogshead tavern.")
    ids = tokenizer.encode(text, add_special_tokens=False)
    row = penalties.row(PenaltyRow((CONCEPT,)))
    for step, token_id in enumerate(ids):
        row.observe(ids[:step])
        blocked = {int(t) for group in row.blocked_ids() for t in group.tolist()}
        assert token_id not in blocked, f"'{penalties.texts[token_id]}' blocked after {text[:40]!r}…"
        assert not blocked & penalties.special_ids, "end-of-text must never be blocked"


def test_partial_blocks_stop_names_early_but_never_short_words(penalties: TokenPenalties, exact: TokenPenalties,
                                                               tokenizer) -> None:
    prefix = tokenizer.encode(" Hog", add_special_tokens=False)
    w = tokenizer.encode("w", add_special_tokens=False)
    assert len(prefix) == len(w) == 1
    # "hogw" begins no common English word: at the default 0.75 the name stops there, so neither "Hogwarts" nor an
    # invented "Hogwrastrain" can be written; blocking only completions (ratio 1) lets it through.
    assert w[0] in _blocked_after(penalties, (CONCEPT,), prefix)
    assert w[0] not in _blocked_after(exact, (CONCEPT,), prefix)
    # Shorter prefixes begin ordinary words ("hog", "hogs", "dumb", "vol") and are never blocked.
    for word in (" hog", " Hog", " hogs", " Dumb", " Vol"):
        assert tokenizer.encode(word, add_special_tokens=False)[0] not in _blocked_after(penalties, (CONCEPT,), [])


def test_short_terms_are_blocked_as_whole_words_and_hyphens_separate(penalties: TokenPenalties, tokenizer) -> None:
    """A short forbidden word blocks the word, not every word it begins ("Han" but not "hand"), and a hyphenated
    term is also blocked spelled with a space ("Obi Wan" for "Obi-Wan")."""
    row = PenaltyRow((CONCEPT,), terms=("Han", "Obi-Wan"))

    def blocked(context: str, word: str) -> bool:
        core = penalties.row(row)
        core.observe(tokenizer.encode(context, add_special_tokens=False))
        token = tokenizer.encode(word, add_special_tokens=False)[0]
        return token in {int(t) for group in core.blocked_ids() for t in group.tolist()}

    assert blocked("Captain", " Han")
    assert not blocked("He raised his", " hand") and not blocked("Please", " handle")
    assert blocked("Greetings, Obi", " Wan") and blocked("Greetings, Obi", "-")


def test_semantic_penalty_hits_related_words_only(penalties: TokenPenalties, tokenizer) -> None:
    concept = penalties.concept(CONCEPT)
    soft = dict(zip(concept.soft_ids.tolist(), concept.soft_values.tolist()))
    settings = penalties.policy.concept(CONCEPT).methods.token_penalty
    potter = tokenizer.encode(" Potter", add_special_tokens=False)[0]
    assert soft[potter] >= settings.soft_penalty * settings.semantic_threshold
    for word in (" Paris", " the", " bread", " computer", " river"):
        assert tokenizer.encode(word, add_special_tokens=False)[0] not in soft, word
    assert len(soft) < 200, "a concept's soft penalty must stay a short list of related words"


def test_vocabulary_embeddings_are_cached_on_disk(guard: Guard, tokenizer, penalties: TokenPenalties) -> None:
    assert list((cache_dir() / "vocabulary-embeddings").glob("*.npz"))
    again = TokenPenalties(guard.policy, tokenizer, guard.classifier.encoder, show_progress=False)
    assert torch.equal(again.concept(CONCEPT).soft_ids, penalties.concept(CONCEPT).soft_ids)


def test_processor_leaves_unpenalised_rows_bit_identical(penalties: TokenPenalties, tokenizer) -> None:
    torch.manual_seed(0)
    scores = torch.randn(3, len(tokenizer))
    original = scores.clone()
    prompt = torch.tensor([[5, 6, 7]] * 3)
    generated = tokenizer.encode(" Harry", add_special_tokens=False)
    input_ids = torch.cat([prompt, torch.tensor([generated] * 3)], dim=1)
    processor = TokenPenaltyProcessor(penalties, [None, PenaltyRow((CONCEPT,)), PenaltyRow(())])
    processor(prompt, scores.clone())  # first call fixes the prompt width
    out = processor(input_ids, scores)
    assert torch.equal(out[0], original[0]) and torch.equal(out[2], original[2])
    potter = tokenizer.encode(" Potter", add_special_tokens=False)[0]
    assert out[1, potter] == float("-inf")


def test_processor_works_on_logits_wider_than_its_vocabulary(penalties: TokenPenalties, tokenizer) -> None:
    """Models often pad their output layer past the tokenizer (a Llama-3-sized head under the SmolLM2 tokenizer
    in benchmarks/overhead.py): extra columns and ids the tokenizer does not know must pass through untouched."""
    width = len(tokenizer) + 1000
    scores = torch.randn(2, width).to(torch.bfloat16)
    original = scores.clone()
    prompt = torch.tensor([[5, 6, 7]] * 2)
    harry = tokenizer.encode(" Harry", add_special_tokens=False)
    processor = TokenPenaltyProcessor(penalties, [PenaltyRow((CONCEPT,))] * 2)
    processor(prompt, scores.clone())
    generated = torch.tensor([[width - 1, *harry], [*harry, width - 1]])  # an id beyond the vocabulary adds no text
    out = processor(torch.cat([prompt, generated], dim=1), scores)
    assert torch.equal(out[:, len(tokenizer):], original[:, len(tokenizer):])
    potter = tokenizer.encode(" Potter", add_special_tokens=False)[0]
    assert out[0, potter] == float("-inf") and out[1, potter] == float("-inf")


def test_strength_scales_the_soft_penalty(penalties: TokenPenalties, tokenizer) -> None:
    logits = torch.zeros(len(tokenizer))
    weak, strong = logits.clone(), logits.clone()
    penalties.row(PenaltyRow((CONCEPT,), 1.0)).step([], weak)
    penalties.row(PenaltyRow((CONCEPT,), 2.0)).step([], strong)
    ron = tokenizer.encode(" Ron", add_special_tokens=False)[0]
    assert weak[ron] < 0
    assert torch.isclose(strong[ron], 2 * weak[ron])


def test_processor_rejects_unknown_concepts_and_wrong_batches(penalties: TokenPenalties) -> None:
    with pytest.raises(TokenPenaltyError, match="not in policy"):
        TokenPenaltyProcessor(penalties, [PenaltyRow(("no-such-concept",))])
    processor = TokenPenaltyProcessor(penalties, [None, None])
    with pytest.raises(TokenPenaltyError, match="2 rows"):
        processor(torch.zeros((3, 4), dtype=torch.long), torch.zeros((3, 10)))


def test_logit_bias_fits_openai_limits_and_breaks_aliases(penalties: TokenPenalties, tokenizer) -> None:
    bias = penalties.logit_bias([CONCEPT, "weapons"])
    assert 0 < len(bias) <= OPENAI_MAX_BIAS_ENTRIES
    assert all(-OPENAI_BIAS_LIMIT <= value < 0 for value in bias.values())
    assert bias[tokenizer.encode(" Potter", add_special_tokens=False)[0]] == -OPENAI_BIAS_LIMIT
    # Distinctive names lose a piece in their usual spellings; common pieces of other names are spared.
    for spelling in ("Harry Potter", " Hogwarts", " Dumbledore", " Hermione Granger", " Hagrid", " J.K. Rowling"):
        assert set(tokenizer.encode(spelling, add_special_tokens=False)) & set(bias), spelling
    for common in (" the", " and", "ther", "old", "itch", " device", " myself"):
        assert tokenizer.encode(common, add_special_tokens=False)[0] not in bias, common
    philosophy = tokenizer.encode(" philosophy", add_special_tokens=False)[0]
    single = penalties.logit_bias([CONCEPT])[philosophy]
    assert -OPENAI_BIAS_LIMIT < single < 0
    assert penalties.logit_bias([CONCEPT], strength=2.0)[philosophy] == pytest.approx(2 * single)


def test_soft_penalty_only_when_hard_block_is_off(guard: Guard, tokenizer) -> None:
    policy = load_policy(POLICY)
    for concept in policy.concepts:
        concept.methods.token_penalty.hard_block = False
    soft_only = TokenPenalties(policy, tokenizer, guard.classifier.encoder, show_progress=False)
    prefix = tokenizer.encode(" Harry", add_special_tokens=False)
    assert _blocked_after(soft_only, (CONCEPT,), prefix) == set()
