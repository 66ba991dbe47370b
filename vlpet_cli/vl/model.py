"""VLModel = backbone + visual projector + PET modules: loss, generation and choice scoring on a batch."""

from __future__ import annotations

import contextlib
import copy
from typing import TYPE_CHECKING, Literal, cast, overload

import torch
from torch import nn
from torch.nn import functional as F

from vlpet_cli import backbones
from vlpet_cli.config import Preset
from vlpet_cli.pet import anatomy
from vlpet_cli.pet.inject import PetModules, set_trainable
from vlpet_cli.vl.identity import backbone_identity
from vlpet_cli.vl.projector import VisualProjector, pool_grid, visual_ids

if TYPE_CHECKING:
    from transformers import GenerationMixin, PreTrainedModel, PreTrainedTokenizerBase
    from transformers.generation.utils import GenerateOutput


def sequence_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None,
                  reduction: str) -> torch.Tensor:
    """Token CE reduced as the reference does: 'token' over the whole batch (captions), or 'example':
    per-example token mean times the example's weight, averaged over the batch (spec pipeline §3.3)."""
    ce = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="none")
    ce = ce.view_as(labels)
    mask = labels.ne(-100)
    if reduction == "token":
        return ce.sum() / mask.sum().clamp(min=1)
    per_example = ce.sum(1) / mask.sum(1).clamp(min=1)
    if weights is not None:
        per_example = per_example * weights.to(per_example.dtype)
    return per_example.mean()


class VLModel(nn.Module):
    """The encoder sees [prompts ; text ; visual] through inputs_embeds, as the reference's forked encoders do."""

    backbone: PreTrainedModel
    projector: VisualProjector
    pet: PetModules
    carried_rows: int  # trailing vocabulary rows an adapter carries; set by artifacts.load_adapter_state, else absent

    def __init__(self, backbone: PreTrainedModel, projector: VisualProjector, pet: PetModules, n_boxes: int):
        super().__init__()
        self.backbone = backbone
        self.projector = projector
        self.pet = pet
        self.n_boxes = n_boxes
        self.family = anatomy.family(backbone)
        self._span: tuple[int, int] | None = None  # (prompt rows, text rows) of the encoder input being run
        self._full_len = 0
        self.identity: dict | None = None  # the pretrained backbone's identity, set when built with weights
        text_modules = anatomy.text_embedding_modules(backbone)
        if text_modules is not None:
            positions, norm = text_modules
            positions.register_forward_pre_hook(self._text_only_position_ids)
            positions.register_forward_hook(self._text_only_positions)
            norm.register_forward_hook(self._text_only_norm)
        biased = anatomy.encoder_position_biases(backbone) + pet.side_position_biases()
        if biased and anatomy.shares_position_bias(backbone):
            for attention in biased:  # the backbone's first layer, and a side network's (LST)
                attention.register_forward_pre_hook(self._text_only_position_bias, with_kwargs=True)
        else:
            for attention in biased:  # UMT5: every layer computes its own bias
                self._text_only_compute_bias(attention)

    # BART adds learned positions to the text tokens only (spec pipeline §3.2): positions 0..t-1 are looked up for
    # the text rows and zeros are placed in the prompt and visual rows; layernorm_embedding then runs over
    # prompts + text (the reference's encoder prepends the prompts to the position-embedded text), not the visual rows.
    def _text_only_position_ids(self, module, args):
        if self._span is None:
            return None
        self._full_len = args[0].shape[1]
        return (args[0][:, :self._span[1]], *args[1:])

    def _text_only_positions(self, module, args, output):
        if self._span is None:
            return output
        prompts, text = self._span
        before = output.new_zeros(output.shape[0], prompts, output.shape[-1])
        after = output.new_zeros(output.shape[0], self._full_len - prompts - text, output.shape[-1])
        return torch.cat([before, output, after], dim=1)

    def _text_only_norm(self, module, args, output):
        if self._span is None:
            return output
        n = sum(self._span)
        return torch.cat([output[:, :n], args[0][:, n:]], dim=1)

    # T5: the reference computes the layer-0 relative position bias over the prompt + text rows only and puts it in
    # the text x text block of an otherwise zero bias; text-visual and visual-visual pairs get none. The stock layer
    # shares the bias it is given with every later layer, and adds the attention mask to it.
    def _text_only_position_bias(self, module, args, kwargs):
        if self._span is None or kwargs.get("position_bias") is not None:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        n, length = sum(self._span), hidden.shape[1]
        block = module.compute_bias(n, n, device=hidden.device)
        bias = block.new_zeros(1, block.shape[1], length, length)
        bias[:, :, :n, :n] = block
        return args, {**kwargs, "position_bias": bias.to(hidden.dtype)}

    # UMT5 computes a bias inside every self-attention (no `position_bias` argument): the same rule, per layer,
    # by giving each encoder attention instance a compute_bias that fills only the text x text block.
    def _text_only_compute_bias(self, attention: nn.Module) -> None:
        inner = attention.compute_bias

        def compute_bias(query_length, key_length, device=None, past_seen_tokens=0):
            if self._span is None:
                return inner(query_length, key_length, device=device, past_seen_tokens=past_seen_tokens)
            n = sum(self._span)
            block = inner(n, n, device=device)
            bias = block.new_zeros(1, block.shape[1], query_length, key_length)
            bias[:, :, :n, :n] = block
            return bias

        # torch types Module.__setattr__'s value as Tensor | Module; a Module takes any attribute
        attention.compute_bias = compute_bias  # type: ignore[assignment]

    @property
    def config(self):
        return self.backbone.config

    # ---- gradient checkpointing (train.gradient_checkpointing) ------------------------------------------------
    def enable_gradient_checkpointing(self) -> None:
        """Recompute each backbone layer in backward instead of keeping its activations. Non-reentrant, so that
        gradients reach the PET modules and projector although the layers' inputs and weights are frozen; the
        recompute runs with the per-forward state (text span, PET task and mask) the layer first ran with."""
        self.backbone.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False, "context_fn": self._recompute_contexts})

    def _recompute_contexts(self):
        """(forward context, recompute context): the recompute sees the state of the forward it repeats."""
        saved = (self._span, self._full_len, self.pet.task, self.pet.encoder_mask)
        return contextlib.nullcontext(), self._state_as(saved)

    @contextlib.contextmanager
    def _state_as(self, saved: tuple):
        current = (self._span, self._full_len, self.pet.task, self.pet.encoder_mask)
        self._span, self._full_len, self.pet.task, self.pet.encoder_mask = saved
        try:
            yield
        finally:
            self._span, self._full_len, self.pet.task, self.pet.encoder_mask = current

    def embed(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(inputs_embeds, attention_mask, text length) of the joint encoder sequence; the mask (text pad mask,
        then the visual mask) is also the decoder's cross-attention mask in forward, generate and score_choices."""
        input_ids, text_mask = batch["input_ids"], batch["attention_mask"]
        encoder = self.backbone.get_encoder()
        text = encoder.embed_tokens(input_ids)
        feats = batch["vis_feats"].to(text.dtype)
        if batch.get("vis_kind") != "video":  # video frames are already resized to data.video.frames
            feats = pool_grid(feats, self.n_boxes)
        b, n_img, per_image, dim = feats.shape
        img_ids, obj_ids = visual_ids(n_img, per_image, feats.device)
        words = anatomy.word_embedding(self.backbone).weight
        vis = self.projector(feats.reshape(b, n_img * per_image, dim), img_ids, obj_ids, words)
        parts = [text, vis.to(text.dtype)]
        vis_mask = batch.get("vis_mask")  # zero for padded video frames (data.video.mask_padding); else all ones
        masks = [text_mask, text_mask.new_ones(b, vis.shape[1]) if vis_mask is None else vis_mask.to(text_mask)]
        prompts = self.pet.prompts(b)
        if prompts is not None:
            # The reference's order: [prompts ; text ; visual] (the prompts sit in the text part).
            prompts = prompts.to(text.dtype)
            parts.insert(0, prompts)
            masks.insert(0, text_mask.new_ones(b, prompts.shape[1]))
        return torch.cat(parts, 1), torch.cat(masks, 1), input_ids.shape[1]

    def prompt_len(self) -> int:
        """Prompt rows in front of the text (0 without prompt tuning)."""
        return self.pet.prompt_length()

    def encode(self, batch: dict):
        """(encoder outputs, attention mask) for a batch; sets the PET context (task, mask)."""
        embeds, mask, text_len = self.embed(batch)
        self.pet.set_context(batch.get("task"), mask)
        self._span = (self.prompt_len(), text_len)
        try:
            out = self.backbone.get_encoder()(inputs_embeds=embeds, attention_mask=mask, return_dict=True)
        finally:
            self._span = None
        return out, mask

    def decoder_inputs(self, labels: torch.Tensor) -> torch.Tensor:
        """Labels shifted right with the decoder start token; -100 becomes pad."""
        cfg = self.backbone.config
        shifted = labels.new_full(labels.shape, cfg.pad_token_id)
        shifted[:, 1:] = labels[:, :-1]
        shifted[:, 0] = cfg.decoder_start_token_id
        return shifted.masked_fill(shifted.eq(-100), cfg.pad_token_id)

    def forward(self, batch: dict) -> torch.Tensor:
        """The training loss of a single-task batch."""
        enc, mask = self.encode(batch)
        labels = batch["labels"]
        out = self.backbone(encoder_outputs=enc, attention_mask=mask,
                            decoder_input_ids=self.decoder_inputs(labels), return_dict=True)
        return sequence_loss(out.logits, labels, batch.get("loss_weights"), batch.get("loss_reduction", "example"))

    @torch.no_grad()
    def generate(self, batch: dict, **kwargs) -> torch.Tensor | GenerateOutput:
        """Generated token ids (or, with return_dict_in_generate, transformers' output holding them and the scores);
        the encoder runs once per batch."""
        enc, mask = self.encode(batch)
        if self.pet.recomputes_decoder():  # LST's side decoder keeps no cache: every step sees the whole prefix
            if kwargs.get("generation_config") is not None:
                kwargs = {**kwargs, "generation_config": copy.deepcopy(kwargs["generation_config"])}
                kwargs["generation_config"].use_cache = False
            else:
                kwargs = {**kwargs, "use_cache": False}
        # the backbone is a ...ForConditionalGeneration: a PreTrainedModel and a GenerationMixin
        generator = cast("GenerationMixin", self.backbone)
        return generator.generate(encoder_outputs=enc, attention_mask=mask, **kwargs)

    @torch.no_grad()
    def score_choices(self, batch: dict, choices: list[list[int]]) -> torch.Tensor:
        """[B, n_choices] logits of each choice's first distinguishing token after a shared prefix
        (NLVR2: 'true' vs 'false'; the decoder input is [start, <s>] for BART, [start] for T5)."""
        j = 0
        while all(len(c) > j for c in choices) and len({c[j] for c in choices}) == 1:
            j += 1
        enc, mask = self.encode(batch)
        start = self.backbone.config.decoder_start_token_id
        prefix = torch.tensor([[start] + list(choices[0][:j])], device=mask.device).expand(mask.shape[0], -1)
        out = self.backbone(encoder_outputs=enc, attention_mask=mask, decoder_input_ids=prefix, return_dict=True)
        last = out.logits[:, -1]
        return torch.stack([last[:, c[j]] for c in choices], dim=1)


@overload
def build_model(preset: Preset, weights: Literal[True] = True) -> tuple[VLModel, PreTrainedTokenizerBase]: ...


@overload
def build_model(preset: Preset, weights: bool) -> tuple[VLModel, PreTrainedTokenizerBase | None]: ...


def build_model(preset: Preset, weights: bool = True) -> tuple[VLModel, PreTrainedTokenizerBase | None]:
    """(VLModel, tokenizer) for a resolved preset; weights=False builds on the meta device for counting."""
    bb = backbones.resolve(preset.model.backbone)
    backbone, tokenizer = backbones.build(bb, weights=weights, dropout=preset.model.dropout)
    d = backbone.config.d_model
    eps = getattr(backbone.config, "layer_norm_epsilon", 1e-6)
    device = torch.device("meta") if not weights else torch.device("cpu")
    with device:
        projector = VisualProjector(preset.model.feat_dim, d, bb.family, eps)
        pet = PetModules(preset.pet, backbone, [(f"projector.{n}", m) for n, m in anatomy.norm_modules(projector)])
    set_trainable(backbone, pet, projector, preset.pet.trainable)
    model = VLModel(backbone, projector, pet, preset.model.n_boxes)
    if weights:
        model.identity = backbone_identity(model)
    return model, tokenizer
