"""A word-level tokenizer over the scene vocabulary, saved with the model like any diffusers tokenizer.

Word tokens make the text side of a toy model easy to learn: a caption is a handful of ids, one per scene word.
Words outside the vocabulary map to ``<unk>``, so any prompt still encodes.
"""

from __future__ import annotations

from typing import Any

from skyray.training.scenes import vocabulary


def scene_tokenizer() -> Any:
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for word in vocabulary():
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=512
    )
