"""Shared fixtures: tiny BART and T5 backbones (random weights, word-level tokenizer) saved to a temp dir."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
# One intra-op thread: the tests' models are tiny, and on a shared 2-core machine a second spinning thread per
# process (pytest, DataLoader workers, two DDP ranks) slows everything down many times over.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# The toy world is built once per test session, away from the user's cache.
os.environ.setdefault("VLPET_CACHE", tempfile.mkdtemp(prefix="vlpet-test-cache-"))

WORDS = ("a the red green blue yellow circle square triangle left right what color is shape how many there "
         "true false yes no caption vqa gpa nlvr : ? . , 1 2 3").split()


def make_tokenizer(family: str):
    """A word-level tokenizer with the family's special tokens and post-processing."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if family == "bart":
        specials = ["<s>", "<pad>", "</s>", "<unk>"]
    else:
        specials = ["<pad>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + list(dict.fromkeys(WORDS)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    if family == "bart":
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", special_tokens=[("<s>", vocab["<s>"]), ("</s>", vocab["</s>"])])
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                       unk_token="<unk>")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", vocab["</s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


def make_backbone(directory: Path, family: str) -> Path:
    """Save a tiny randomly initialised BART or T5 with its tokenizer to `directory`."""
    import torch
    from transformers import BartConfig, BartForConditionalGeneration, T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    tok = make_tokenizer(family)
    if family == "bart":
        cfg = BartConfig(vocab_size=len(tok), d_model=32, encoder_layers=2, decoder_layers=2,
                         encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                         decoder_ffn_dim=64, max_position_embeddings=64, pad_token_id=1, bos_token_id=0,
                         eos_token_id=2, decoder_start_token_id=2, forced_bos_token_id=None,
                         forced_eos_token_id=None)
        model = BartForConditionalGeneration(cfg)
    else:
        cfg = T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                       pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
        model = T5ForConditionalGeneration(cfg)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("backbones")
    return {fam: make_backbone(root / f"tiny-{fam}", fam) for fam in ("bart", "t5")}


def _files_state(directory: Path) -> tuple:
    """(name, size, mtime) of every file of a model directory: a rewritten checkpoint is a new cache key."""
    return tuple(sorted((p.name, s.st_size, s.st_mtime_ns) for p in directory.iterdir() if p.is_file()
                        for s in [p.stat()]))


@pytest.fixture(scope="session", autouse=True)
def loaded_models_are_memoised():
    """Tests build the same tiny backbones hundreds of times; `from_pretrained` costs ~30 ms of CPU each (the
    model is built with a random init, then the checkpoint overwrites it). Each (class, directory, arguments, file
    state) is loaded once per session and handed out as a deep copy, equal to a fresh load tensor for tensor (the
    load draws no random numbers). Tests that replace `from_pretrained` with monkeypatch still replace it."""
    import copy

    from transformers import PreTrainedModel

    original = PreTrainedModel.from_pretrained.__func__
    cache: dict = {}

    def from_pretrained(cls, path, *args, **kwargs):
        directory = Path(path)
        if args or not directory.is_dir():
            return original(cls, path, *args, **kwargs)
        key = (cls, str(directory.resolve()), repr(sorted(kwargs.items())), _files_state(directory))
        if key not in cache:
            cache[key] = original(cls, path, **kwargs)
        return copy.deepcopy(cache[key])

    PreTrainedModel.from_pretrained = classmethod(from_pretrained)
    yield
    PreTrainedModel.from_pretrained = classmethod(original)
