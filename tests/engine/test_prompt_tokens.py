"""Prompts the text encoder cuts: the loaded tokenizer counts them exactly (PromptCache.truncated and a log line),
and the plan's warning, made before any model loads, agrees with it for the built-in tiny model."""

from __future__ import annotations

import json
import logging

import pytest

from skyray.engine.text import MAX_TEXT_TOKENS, PromptCache, token_count
from skyray.storyboard import parse_storyboard

PROMPTS = ["a harbor at dawn", "x" * 511, "x" * 512, "a  b\n\t " * 120, "fog " * 127 + "end", "fog " * 128 + "end"]


def board_warns(prompt: str, tmp_path) -> bool:
    text = f"title: t\nresolution: 64x64\nshots:\n  - id: a\n    frames: 9\n    prompt: {json.dumps(prompt)}\n"
    return any("text encoder reads the first 512" in w for w in parse_storyboard(text, tmp_path).warnings)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_plan_warning_agrees_with_the_tiny_tokenizer(tiny, tmp_path, prompt: str) -> None:
    assert board_warns(prompt, tmp_path) == (token_count(tiny.tokenizer, prompt) > MAX_TEXT_TOKENS)


def test_prompt_cache_records_and_logs_what_it_cuts(tiny, caplog) -> None:
    cache = PromptCache(tiny.tokenizer, tiny.text_encoder)
    long = "x" * 700
    with caplog.at_level(logging.WARNING, logger="skyray.engine"):
        cache.get("a harbor at dawn")
        cache.get(long)
        cache.get(long)  # cached: counted and logged once
    assert cache.truncated == {long: 701}
    assert len(caplog.records) == 1
    assert caplog.records[0].getMessage().startswith("a prompt of 701 tokens is cut to the text encoder's 512: 'xxx")
    assert cache.get(long).shape[1] == MAX_TEXT_TOKENS
