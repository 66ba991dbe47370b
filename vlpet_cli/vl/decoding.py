"""How a family decodes: every generation setting spelled out for `model.generate`."""

from __future__ import annotations

from vlpet_cli.config import GenerationSpec


def generation_kwargs(spec: GenerationSpec, family: str, tokenizer) -> dict:
    """Every decoding setting spelled out, so nothing is inherited silently from a model's config.

    BART keeps the reference's effective defaults (facebook/bart-base's config: no_repeat_ngram_size 3, forced
    BOS, early stopping) unless overridden; T5 has none of them.
    """
    ngram = spec.no_repeat_ngram_size
    kwargs = {"num_beams": spec.num_beams, "max_length": spec.max_length, "do_sample": False,
              "no_repeat_ngram_size": 3 if ngram is None and family == "bart" else (ngram or 0),
              "early_stopping": spec.num_beams > 1, "length_penalty": 1.0,
              "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
    if family == "bart" and tokenizer.bos_token_id is not None:
        kwargs["forced_bos_token_id"] = tokenizer.bos_token_id
    return kwargs


def generation_config(spec: GenerationSpec, family: str, tokenizer, decoder_start_token_id: int):
    """A transformers GenerationConfig holding every setting of `generation_kwargs`."""
    from transformers import GenerationConfig

    return GenerationConfig(decoder_start_token_id=decoder_start_token_id,
                            **generation_kwargs(spec, family, tokenizer))
