"""Resolve --backbone (built-in name, local directory or hub id) to a config, a tokenizer and weights."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

from vlpet_cli.errors import VlpetError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

ASSETS = Path(__file__).parent / "assets" / "backbones"


class Builtin(TypedDict):
    hub_id: str
    tokenizer_size: int
    config: dict[str, Any]


# What every published config.json of a family says alike; each model below adds its own sizes and settings.
_BART = dict(model_type="bart", vocab_size=50265, max_position_embeddings=1024, activation_function="gelu",
             dropout=0.1, scale_embedding=False, pad_token_id=1, bos_token_id=0, eos_token_id=2,
             decoder_start_token_id=2, forced_bos_token_id=0, forced_eos_token_id=2)
_T5 = dict(model_type="t5", vocab_size=32128, d_kv=64, relative_attention_num_buckets=32, dropout_rate=0.1,
           pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
_T5_V1_1 = dict(_T5, relative_attention_max_distance=128, feed_forward_proj="gated-gelu", tie_word_embeddings=False)


def _bart(d_model: int, layers: int, heads: int, ffn: int, dropout: float) -> dict[str, Any]:
    """A BART config with these sizes in both stacks; `dropout`: its attention and activation dropout."""
    return dict(_BART, d_model=d_model, encoder_layers=layers, decoder_layers=layers, encoder_attention_heads=heads,
                decoder_attention_heads=heads, encoder_ffn_dim=ffn, decoder_ffn_dim=ffn, attention_dropout=dropout,
                activation_dropout=dropout)


def _t5(base: dict[str, Any], d_model: int, d_ff: int, layers: int, heads: int, **settings: Any) -> dict[str, Any]:
    """A T5-family config with these sizes in both stacks."""
    return dict(base, d_model=d_model, d_ff=d_ff, num_layers=layers, num_decoder_layers=layers, num_heads=heads,
                **settings)


# Weight-free configs for counting, with the size of each model's own tokenizer (the vocabulary is resized to it
# plus the added special tokens, spec modules §3). All but bart-base and t5-base are written from the published
# config.json of each hub id (and its tokenizer's length).
BUILTIN: dict[str, Builtin] = {
    "bart-base": {"hub_id": "facebook/bart-base", "tokenizer_size": 50265,
                  "config": _bart(d_model=768, layers=6, heads=12, ffn=3072, dropout=0.1)},
    "t5-base": {"hub_id": "google-t5/t5-base", "tokenizer_size": 32100,
                "config": _t5(_T5, d_model=768, d_ff=3072, layers=12, heads=12, feed_forward_proj="relu",
                              tie_word_embeddings=True)},
    "bart-large": {"hub_id": "facebook/bart-large", "tokenizer_size": 50265,
                   "config": _bart(d_model=1024, layers=12, heads=16, ffn=4096, dropout=0.0)},
    "t5-large": {"hub_id": "google-t5/t5-large", "tokenizer_size": 32100,
                 "config": _t5(_T5, d_model=1024, d_ff=4096, layers=24, heads=16, feed_forward_proj="relu",
                               tie_word_embeddings=True)},
    # T5 v1.1 architecture: gated-GELU FFN (wi_0, wi_1), untied LM head, no head scaling
    "flan-t5-base": {"hub_id": "google/flan-t5-base", "tokenizer_size": 32100,
                     "config": _t5(_T5_V1_1, d_model=768, d_ff=2048, layers=12, heads=12)},
    "mt5-base": {"hub_id": "google/mt5-base", "tokenizer_size": 250100,
                 "config": _t5(_T5_V1_1, d_model=768, d_ff=2048, layers=12, heads=12, model_type="mt5",
                               vocab_size=250112)},
}
TINY = ("tiny-bart", "tiny-t5")
ALIASES = {"facebook/bart-base": "bart-base", "t5-base": "t5-base", "google-t5/t5-base": "t5-base",
           "facebook/bart-large": "bart-large", "t5-large": "t5-large", "google-t5/t5-large": "t5-large",
           "google/flan-t5-base": "flan-t5-base", "google/mt5-base": "mt5-base"}
# model_type -> family: the family decides the module paths (pet/anatomy.py), the preset section (`t5:` for the
# whole T5 family) and the reference's conventions (extra tokens, init); the model type picks the HF class.
FAMILIES = {"bart": "bart", "mbart": "bart", "t5": "t5", "mt5": "t5", "umt5": "t5"}
MBART_LANGUAGE = "en_XX"  # mBART's decoder starts with the target language code; vlpet's tasks are English
N_EXTRA = 100  # <extra_id_k> sentinels (BART gets them added; T5 has them)
N_VIS = 100  # <vis_extra_id_k> tokens whose embedding rows are the object-order codes


@dataclass
class Backbone:
    """A resolved backbone: the name the user gave, its family and where its files are."""

    name: str
    family: str
    directory: Path | None  # a local directory with config, weights and tokenizer (None: built-in config only)
    builtin: str | None = None


def _config_json(directory: Path) -> dict:
    path = directory / "config.json"
    if not path.exists():
        raise VlpetError(f"{directory} is not a model directory: it has no config.json")
    return json.loads(path.read_text())


def _family_from_type(model_type: str, where: str) -> str:
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    raise VlpetError(f"{where}: model type '{model_type}' is not supported; vlpet works with BART and T5 family "
                     f"encoder-decoders, model_type {', '.join(FAMILIES)}")


def _cached_snapshot(hub_id: str) -> Path | None:
    """The local HF cache directory of a hub id, or None when it was never downloaded."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(hub_id, local_files_only=True))
    except Exception:
        return None


def resolve(name: str) -> Backbone:
    """A Backbone for a built-in name, a local directory or a hub id available in the local cache."""
    key = ALIASES.get(name, name)
    if key in TINY:
        return Backbone(name, "bart" if key == "tiny-bart" else "t5", ASSETS / key, key)
    if Path(name).expanduser().is_dir():
        directory = Path(name).expanduser()
        return Backbone(name, _family_from_type(_config_json(directory).get("model_type", ""), str(directory)),
                        directory)
    if key in BUILTIN:
        snapshot = _cached_snapshot(BUILTIN[key]["hub_id"])
        return Backbone(name, FAMILIES[BUILTIN[key]["config"]["model_type"]], snapshot, key)
    snapshot = _cached_snapshot(name)
    if snapshot is None:
        raise VlpetError(
            f"backbone '{name}' is neither a built-in name ({', '.join([*BUILTIN, *TINY])}), a local directory, "
            f"nor in the local Hugging Face cache. Download it on a connected machine with "
            f"`hf download {name} --local-dir DIR` and pass --backbone DIR"
        )
    return Backbone(name, _family_from_type(_config_json(snapshot).get("model_type", ""), name), snapshot)


def family_of(name: str) -> str:
    """'bart' or 't5' (the family, e.g. 't5' for mT5) for a backbone name, without loading weights."""
    return resolve(name).family


def load_config(bb: Backbone):
    """The transformers config: from the directory when there is one, else the built-in one."""
    from transformers import AutoConfig

    if bb.directory is not None:
        return AutoConfig.from_pretrained(bb.directory, local_files_only=True)
    assert bb.builtin is not None, "a backbone without a directory is a built-in one"
    spec = dict(BUILTIN[bb.builtin]["config"])
    return AutoConfig.for_model(spec.pop("model_type"), **spec)


def model_class(model_type: str):
    """The stock transformers seq2seq LM class of a supported model_type."""
    from transformers import (
        BartForConditionalGeneration,
        MBartForConditionalGeneration,
        MT5ForConditionalGeneration,
        T5ForConditionalGeneration,
        UMT5ForConditionalGeneration,
    )

    classes = {"bart": BartForConditionalGeneration, "mbart": MBartForConditionalGeneration,
               "t5": T5ForConditionalGeneration, "mt5": MT5ForConditionalGeneration,
               "umt5": UMT5ForConditionalGeneration}
    if model_type not in classes:
        raise VlpetError(f"model type '{model_type}' is not supported; supported: {', '.join(classes)}")
    return classes[model_type]


def head_is_untied(config) -> bool:
    """Whether checkpoints of this config have their own LM head (T5 v1.1, Flan-T5, mT5, UMT5). transformers 5
    forces the T5 family's `tie_word_embeddings` to True (T5 and UMT5 keep the checkpoint's flag in
    `scale_decoder_outputs`, False exactly when the head is untied; mT5 keeps nothing, all its checkpoints are
    untied) and unties only while loading a checkpoint whose head differs. Used for weight-free builds."""
    model_type = getattr(config, "model_type", "")
    if model_type == "mt5":
        return True
    if model_type in ("t5", "umt5"):
        return not getattr(config, "scale_decoder_outputs", True)
    return not getattr(config, "tie_word_embeddings", True)


def untie_head(model, rows: torch.Tensor | None = None) -> None:
    """Give the model its own LM head (a copy of `rows`, default the current head) and record it in the config,
    so that neither resizing nor save/reload ties it back to the word embedding."""
    import torch

    head = model.get_output_embeddings()
    weight = head.weight if rows is None else rows
    head.weight = torch.nn.Parameter(weight.detach().clone(), requires_grad=head.weight.requires_grad)
    model.config.tie_word_embeddings = False


def extend_tokenizer(tokenizer: PreTrainedTokenizerBase, family: str) -> None:
    """Add the reference's special tokens: BART <extra_id_99..0> then <vis_extra_id_99..0>; T5 the vis ones."""
    vocab = tokenizer.get_vocab()
    new = []
    if family == "bart" and "<extra_id_0>" not in vocab:
        new += [f"<extra_id_{k}>" for k in reversed(range(N_EXTRA))]
    if "<vis_extra_id_0>" not in vocab:
        new += [f"<vis_extra_id_{k}>" for k in reversed(range(N_VIS))]
    if new:
        tokenizer.add_special_tokens({"additional_special_tokens": new}, replace_extra_special_tokens=False)


def vocab_size_without_weights(bb: Backbone, config) -> int:
    """Rows of the resized embedding for a weight-free build: tokenizer size plus the added tokens."""
    if bb.builtin is not None and bb.builtin in BUILTIN:
        size = BUILTIN[bb.builtin]["tokenizer_size"]
        return size + (N_EXTRA if bb.family == "bart" else 0) + N_VIS
    tok = load_tokenizer(bb)
    return len(tok)


def load_tokenizer(bb: Backbone):
    """The backbone's tokenizer with vlpet's special tokens added."""
    from transformers import AutoTokenizer

    if bb.directory is None:
        assert bb.builtin is not None, "a backbone without a directory is a built-in one"
        hub_id = BUILTIN[bb.builtin]["hub_id"]
        raise VlpetError(
            f"'{bb.name}' has no local weights or tokenizer (only its built-in config, enough for `vlpet params`). "
            f"Download it with `hf download {hub_id} --local-dir DIR` and pass --backbone DIR"
        )
    try:
        tok = AutoTokenizer.from_pretrained(bb.directory, local_files_only=True)
    except Exception as exc:
        raise VlpetError(f"cannot load a tokenizer from {bb.directory}: {exc}") from None
    extend_tokenizer(tok, bb.family)
    return tok


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def check_weights(bb: Backbone) -> None:
    """A backbone to train or evaluate needs weights, not just the config `vlpet params` is content with."""
    if bb.directory is None:
        load_tokenizer(bb)  # raises the clear "no local weights" message
        return
    if not any((bb.directory / name).is_file() for name in WEIGHT_FILES):
        raise VlpetError(
            f"backbone directory {bb.directory} has a config.json but no weights ({' or '.join(WEIGHT_FILES[::2])}); "
            f"copy the model's weight files there (a config alone is enough only for `vlpet params`)")


# The backbone config's dropout rates (BART, mBART: the first three; T5 family: dropout_rate), all of which the
# reference's trainer sets to its --dropout.
DROPOUT_RATES = ("dropout", "attention_dropout", "activation_dropout", "dropout_rate")


def dropout_rates(config, rate: float | None) -> dict[str, float]:
    """{config key: rate} for every dropout rate the config has; {} for None (keep the checkpoint's own)."""
    return {} if rate is None else {k: rate for k in DROPOUT_RATES if hasattr(config, k)}


def build(bb: Backbone, weights: bool = True,
          dropout: float | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """(model, tokenizer) with the vocabulary resized; weights=False builds on the meta device (no tokenizer).
    `dropout` sets every dropout rate of the config (None: the checkpoint's own)."""
    import torch

    config = load_config(bb)
    cls = model_class(config.model_type)
    rates = dropout_rates(config, dropout)
    config.update(rates)
    if not weights:
        config.vocab_size = vocab_size_without_weights(bb, config)
        with torch.device("meta"):
            model = cls(config)
            if head_is_untied(config):
                untie_head(model, torch.empty_like(model.get_input_embeddings().weight))
        return model, None
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    check_weights(bb)
    tokenizer = load_tokenizer(bb)
    try:
        model = cls.from_pretrained(bb.directory, local_files_only=True, **rates)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise VlpetError(f"cannot load the backbone weights from {bb.directory}: {first}") from None
    head = model.get_output_embeddings().weight
    head = head.detach().clone() if head is not model.get_input_embeddings().weight else None
    old = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    new_rows = model.get_input_embeddings().weight.data[old:]
    gen = torch.Generator().manual_seed(0)
    std = 0.02 if bb.family == "bart" else 1.0
    if new_rows.numel():
        # The reference's new rows keep the model's own init: BART N(0, 0.02), T5 N(0, 1). A fixed generator makes
        # the built backbone the same in every process and run (the object-order rows are saved with adapters).
        new_rows.copy_(torch.randn(new_rows.shape, generator=gen) * std)
    if head is not None:
        # resize_token_embeddings ties the head back (the forced config flag); restore the checkpoint's head,
        # grown or cut to the new vocabulary, its added rows drawn from the same fixed generator.
        n = len(tokenizer)
        extra = torch.randn(max(n - head.shape[0], 0), head.shape[1], generator=gen) * std
        untie_head(model, torch.cat([head[:n], extra.to(head.dtype)]))
    model.config.vocab_size = len(tokenizer)
    if config.model_type == "mbart":
        _mbart_language(model, tokenizer)
    return model, tokenizer


def _mbart_language(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """mBART (cc25 convention): the decoder starts with the target language code (en_XX), not with </s>; labels
    stay `text </s>`. Where the tokenizer has no en_XX, the config's decoder start is kept."""
    lang = tokenizer.convert_tokens_to_ids(MBART_LANGUAGE)
    if lang is None or lang == tokenizer.unk_token_id:
        return
    model.config.decoder_start_token_id = lang
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.decoder_start_token_id = lang
        model.generation_config.forced_bos_token_id = None
