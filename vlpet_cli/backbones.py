"""Resolve --backbone (built-in name, local directory or hub id) to a config, a tokenizer and weights."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from vlpet_cli.errors import VlpetError

ASSETS = Path(__file__).parent / "assets" / "backbones"

# Weight-free configs for counting, with the size of each model's own tokenizer (the vocabulary is resized to it
# plus the added special tokens, spec modules §3).
BUILTIN = {
    "bart-base": {
        "hub_id": "facebook/bart-base", "tokenizer_size": 50265,
        "config": dict(model_type="bart", vocab_size=50265, d_model=768, encoder_layers=6, decoder_layers=6,
                       encoder_attention_heads=12, decoder_attention_heads=12, encoder_ffn_dim=3072,
                       decoder_ffn_dim=3072, max_position_embeddings=1024, activation_function="gelu",
                       dropout=0.1, attention_dropout=0.1, activation_dropout=0.1, scale_embedding=False,
                       pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
                       forced_bos_token_id=0, forced_eos_token_id=2),
    },
    "t5-base": {
        "hub_id": "google-t5/t5-base", "tokenizer_size": 32100,
        "config": dict(model_type="t5", vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=12,
                       num_decoder_layers=12, num_heads=12, relative_attention_num_buckets=32, dropout_rate=0.1,
                       feed_forward_proj="relu", tie_word_embeddings=True, pad_token_id=0, eos_token_id=1,
                       decoder_start_token_id=0),
    },
}
TINY = ("tiny-bart", "tiny-t5")
ALIASES = {"facebook/bart-base": "bart-base", "t5-base": "t5-base", "google-t5/t5-base": "t5-base"}
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
    if model_type in ("bart", "t5"):
        return model_type
    raise VlpetError(f"{where}: model type '{model_type}' is not supported; vlpet works with BART and T5 models")


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
        return Backbone(name, BUILTIN[key]["config"]["model_type"], snapshot, key)
    snapshot = _cached_snapshot(name)
    if snapshot is None:
        raise VlpetError(
            f"backbone '{name}' is neither a built-in name ({', '.join([*BUILTIN, *TINY])}), a local directory, "
            f"nor in the local Hugging Face cache. Download it on a connected machine with "
            f"`huggingface-cli download {name} --local-dir DIR` and pass --backbone DIR"
        )
    return Backbone(name, _family_from_type(_config_json(snapshot).get("model_type", ""), name), snapshot)


def family_of(name: str) -> str:
    """'bart' or 't5' for a backbone name, without loading weights."""
    return resolve(name).family


def load_config(bb: Backbone):
    """The transformers config: from the directory when there is one, else the built-in one."""
    from transformers import AutoConfig, BartConfig, T5Config

    if bb.directory is not None:
        return AutoConfig.from_pretrained(bb.directory, local_files_only=True)
    spec = dict(BUILTIN[bb.builtin]["config"])
    cls = BartConfig if spec.pop("model_type") == "bart" else T5Config
    return cls(**spec)


def model_class(family: str):
    from transformers import BartForConditionalGeneration, T5ForConditionalGeneration

    return BartForConditionalGeneration if family == "bart" else T5ForConditionalGeneration


def extend_tokenizer(tokenizer, family: str) -> None:
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
    if bb.builtin in BUILTIN:
        size = BUILTIN[bb.builtin]["tokenizer_size"]
        return size + (N_EXTRA if bb.family == "bart" else 0) + N_VIS
    tok = load_tokenizer(bb)
    return len(tok)


def load_tokenizer(bb: Backbone):
    """The backbone's tokenizer with vlpet's special tokens added."""
    from transformers import AutoTokenizer

    if bb.directory is None:
        hub_id = BUILTIN[bb.builtin]["hub_id"]
        raise VlpetError(
            f"'{bb.name}' has no local weights or tokenizer (only its built-in config, enough for `vlpet params`). "
            f"Download it with `huggingface-cli download {hub_id} --local-dir DIR` and pass --backbone DIR"
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


def build(bb: Backbone, weights: bool = True):
    """(model, tokenizer) with the vocabulary resized; weights=False builds on the meta device (no tokenizer)."""
    import torch

    config = load_config(bb)
    cls = model_class(bb.family)
    if not weights:
        config.vocab_size = vocab_size_without_weights(bb, config)
        with torch.device("meta"):
            return cls(config), None
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    check_weights(bb)
    tokenizer = load_tokenizer(bb)
    try:
        model = cls.from_pretrained(bb.directory, local_files_only=True)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise VlpetError(f"cannot load the backbone weights from {bb.directory}: {first}") from None
    old = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    new_rows = model.get_input_embeddings().weight.data[old:]
    if new_rows.numel():
        # The reference's new rows keep the model's own init: BART N(0, 0.02), T5 N(0, 1). A fixed generator makes
        # the built backbone the same in every process and run (the object-order rows are saved with adapters).
        gen = torch.Generator().manual_seed(0)
        std = 0.02 if bb.family == "bart" else 1.0
        new_rows.copy_(torch.randn(new_rows.shape, generator=gen) * std)
    model.config.vocab_size = len(tokenizer)
    return model, tokenizer
