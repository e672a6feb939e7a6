"""Prompt -> UMT5 embeddings, padded the way SkyReels-V2 was trained (zeros past the prompt, 512 tokens)."""

from __future__ import annotations

import html
import logging
import re
from dataclasses import dataclass

import torch

MAX_TEXT_TOKENS = 512
log = logging.getLogger("skyray.engine")


def clean_prompt(text: str) -> str:
    """Same normalisation as the reference pipelines (ftfy, double HTML unescape, collapsed whitespace)."""
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:  # ftfy is a dependency; tolerate its absence rather than fail on a cosmetic step
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


@dataclass
class TextEmbeds:
    """Conditional and (with CFG) unconditional embeddings for one window, [1, 512, text_dim] each."""

    cond: torch.Tensor
    uncond: torch.Tensor | None

    def to(self, device: torch.device, dtype: torch.dtype) -> TextEmbeds:
        u = None if self.uncond is None else self.uncond.to(device, dtype)
        return TextEmbeds(self.cond.to(device, dtype), u)


@torch.no_grad()
def encode(tokenizer, text_encoder, prompts: list[str], max_len: int = MAX_TEXT_TOKENS) -> torch.Tensor:
    """Embeddings [len(prompts), max_len, dim]; positions past each prompt's length are exactly zero."""
    batch = tokenizer(
        [clean_prompt(p) for p in prompts],
        padding="max_length",
        max_length=max_len,
        truncation=True,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    device = next(text_encoder.parameters()).device
    hidden = text_encoder(batch.input_ids.to(device), batch.attention_mask.to(device)).last_hidden_state
    lengths = batch.attention_mask.sum(dim=1).tolist()
    out = torch.zeros_like(hidden)
    for i, n in enumerate(lengths):
        out[i, :n] = hidden[i, :n]
    return out


def token_count(tokenizer, prompt: str) -> int:
    """Tokens of ``prompt`` as the encoder would read them before truncation (end-of-text token included)."""
    ids = tokenizer(clean_prompt(prompt), add_special_tokens=True, truncation=False, verbose=False).input_ids
    return len(ids)


class PromptCache:
    """Encodes each distinct prompt once per render (prompt travel and CFG reuse the same strings).

    ``truncated`` maps every prompt the encoder cut to its full token count (the plan warns from an estimate;
    only the loaded tokenizer knows)."""

    def __init__(self, tokenizer, text_encoder) -> None:
        self._tokenizer = tokenizer
        self._encoder = text_encoder
        self._cache: dict[str, torch.Tensor] = {}
        self.truncated: dict[str, int] = {}

    def __contains__(self, prompt: str) -> bool:
        return prompt in self._cache

    def get(self, prompt: str) -> torch.Tensor:
        if prompt not in self._cache:
            tokens = token_count(self._tokenizer, prompt)
            if tokens > MAX_TEXT_TOKENS:
                self.truncated[prompt] = tokens
                log.warning("a prompt of %d tokens is cut to the text encoder's %d: %.80r", tokens, MAX_TEXT_TOKENS,
                            prompt)
            self._cache[prompt] = encode(self._tokenizer, self._encoder, [prompt])
        return self._cache[prompt]

    def embeds(self, prompt: str, negative_prompt: str, guidance: bool) -> TextEmbeds:
        return TextEmbeds(self.get(prompt), self.get(negative_prompt) if guidance else None)
