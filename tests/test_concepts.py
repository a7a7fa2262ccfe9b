"""Concepts and token location: multi-word, multi-token, repeats, case, SDXL, bad words."""

from __future__ import annotations

import pytest

from forget_me_not.concepts import (
    Concept,
    TokenMask,
    locate_tokens,
    merge_positions,
)
from forget_me_not.errors import FmnError
from tiny_pipelines import make_tokenizer


def test_default_templates_follow_the_paper():
    assert Concept("star").prompts() == ["a photo of star"]
    assert Concept("zorbo", "id").prompts() == ["a photo of zorbo"]
    assert Concept("van gogh", "style").prompts() == ["a photo in the style of van gogh"]
    assert Concept("nude", "nsfw").prompts() == ["a photo of nude"]
    extra = Concept("star").with_extra_templates()
    assert extra.templates[0] == "a photo of {}" and len(extra.templates) > 1
    assert Concept("x", token_words="<c0> <c1>").prompts() == ["a photo of <c0> <c1>"]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"name": ""}, "empty"),
        ({"name": "star", "category": "animal"}, "category"),
        ({"name": "star", "templates": ("no slot",)}, "exactly once"),
    ],
)
def test_concept_validation(kwargs, match):
    with pytest.raises(FmnError, match=match):
        Concept(**kwargs)


@pytest.mark.parametrize(
    "prompt, words, expected",
    [
        ("a photo of star", "star", [4]),  # bos a photo of star
        ("a photo in the style of van gogh", "van gogh", [7, 8]),  # multi-word
        ("a photo of Van Gogh", "van gogh", [4, 5]),  # case-insensitive
        ("a star and a STAR", "star", [2, 5]),  # repeated occurrences
        ("a photo of a red star", "red star", [5, 6]),
    ],
)
def test_locate_tokens(prompt, words, expected):
    assert locate_tokens(make_tokenizer(), prompt, words) == expected


def test_multi_token_word_and_eot():
    tok = make_tokenizer()
    # "zorbos" is not in the vocab as one token: it splits into "zorbo" + "s</w>"-like pieces.
    ids = tok("zorbos", add_special_tokens=False)["input_ids"]
    assert len(ids) > 1
    positions = locate_tokens(tok, "a photo of zorbos", "zorbos")
    assert positions == list(range(4, 4 + len(ids)))
    with_eot = locate_tokens(tok, "a photo of star", "star", extra="eot")
    assert with_eot == [4, 5]  # the first end-of-text right after the prompt
    with_padding = locate_tokens(tok, "a photo of star", "star", extra="padding")
    assert with_padding == [4] + list(range(5, tok.model_max_length))  # every padding slot


def test_placeholder_tokens_after_adding_them():
    tok = make_tokenizer()
    tok.add_tokens(["<c0>", "<c1>"])
    assert locate_tokens(tok, "a photo of <c0> <c1>", "<c0> <c1>") == [4, 5]


@pytest.mark.parametrize(
    "prompt, words, match",
    [
        ("a photo of star", "moon", "fmn invert"),  # absent from the prompt
        ("a photo of qwxz", "qwxz", "fmn invert"),  # spelt letter by letter: unknown word
    ],
)
def test_bad_words_suggest_inversion(prompt, words, match):
    with pytest.raises(FmnError, match=match):
        locate_tokens(make_tokenizer(), prompt, words)


def test_sdxl_positions_per_tokenizer():
    from forget_me_not.concepts import locate_in_pipeline
    from tiny_pipelines import make_tiny_pipeline

    pipe = make_tiny_pipeline("sdxl")
    per = locate_in_pipeline(pipe, "a photo of a red star", "star", extra="eot")
    assert len(per) == 2 and per[0] == per[1] == [6, 7]
    assert merge_positions([[1, 2], [2, 3]]) == [1, 2, 3]


def test_token_mask_rows():
    mask = TokenMask.from_positions([[4], [5, 6, 7]], 77)
    assert mask.index.tolist() == [[4, 0, 0], [5, 6, 7]]
    assert mask.valid.tolist() == [[True, False, False], [True, True, True]]
    dense = mask.dense()
    assert dense[0].nonzero().flatten().tolist() == [4]
    assert dense[1].nonzero().flatten().tolist() == [5, 6, 7]
    with pytest.raises(FmnError):
        TokenMask.from_positions([[4], []], 77)
    with pytest.raises(FmnError):
        TokenMask.from_positions([[80]], 77)
