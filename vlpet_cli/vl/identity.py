"""The backbone's identity: what an adapter must match to be loaded onto a backbone."""

from __future__ import annotations

import hashlib

from vlpet_cli.backbones import N_VIS
from vlpet_cli.pet import anatomy


def backbone_identity(model) -> dict:
    """What an adapter must match: architecture numbers and a fingerprint of the pretrained word embedding,
    taken when the model is built (so full fine-tuning, which trains the embedding, keeps its identity)."""
    if getattr(model, "identity", None) is not None:
        return model.identity
    cfg = model.backbone.config
    words = anatomy.word_embedding(model.backbone).weight
    head = words.detach()[: -N_VIS][:256].float().contiguous().cpu().numpy().tobytes()
    return {"model_type": cfg.model_type, "d_model": cfg.d_model, "vocab_size": int(words.shape[0]),
            "layers": list(anatomy.num_layers(model.backbone)), "fingerprint": hashlib.sha256(head).hexdigest()[:16]}
