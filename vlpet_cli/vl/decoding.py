"""How a family decodes: every generation setting spelled out for `model.generate`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from vlpet_cli.config import GenerationSpec

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def generation_kwargs(spec: GenerationSpec, family: str, tokenizer: PreTrainedTokenizerBase) -> dict:
    """Every decoding setting spelled out, so nothing is inherited silently from a model's config.

    BART decodes as the reference did under transformers 4.2.1 with facebook/bart-base's config: no_repeat_ngram_size
    3 and early stopping unless overridden, no forced BOS (4.2.1 ignored `forced_bos_token_id`), and in beam search
    `</s>` forced at `max_length - 1` (BART's `adjust_logits_during_generation`); greedy decoding forces nothing.
    T5 has none of these.
    """
    assert spec.num_beams is not None, "the task's own settings fill what eval.generation leaves open"
    ngram = spec.no_repeat_ngram_size
    beams = spec.num_beams > 1
    kwargs = {"num_beams": spec.num_beams, "max_length": spec.max_length, "do_sample": False,
              "no_repeat_ngram_size": 3 if ngram is None and family == "bart" else (ngram or 0),
              "early_stopping": beams, "length_penalty": 1.0,
              "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id,
              "forced_bos_token_id": None,
              "forced_eos_token_id": tokenizer.eos_token_id if family == "bart" and beams else None}
    return kwargs

