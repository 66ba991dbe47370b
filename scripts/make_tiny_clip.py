"""Build the tiny CLIP vision model shipped in vlpet_cli/assets/tiny-clip (random weights, fixed seed).

112 px images, 16 px patches (7x7 = 49 patch tokens, the reference grid), hidden size 64, 2 layers, 2 heads.
It exists so extraction runs offline in tests and demos; its features carry no meaning.
Usage: python scripts/make_tiny_clip.py [OUT_DIR]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "vlpet_cli" / "assets" / "tiny-clip"
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def build_tiny_clip(out_dir: Path, seed: int = 0) -> Path:
    """Write config.json, model.safetensors and preprocessor_config.json of the tiny model to out_dir."""
    import torch
    import transformers
    from transformers import CLIPVisionConfig, CLIPVisionModel

    transformers.utils.logging.disable_progress_bar()

    config = CLIPVisionConfig(
        image_size=112, patch_size=16, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=128, projection_dim=64,
    )
    torch.manual_seed(seed)
    model = CLIPVisionModel(config).eval()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    (out_dir / "model.safetensors").chmod(0o644)  # safetensors writes owner-only files; ship it readable
    preprocessor = {
        "image_processor_type": "CLIPImageProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"shortest_edge": 112},
        "resample": 3,
        "do_center_crop": True,
        "crop_size": {"height": 112, "width": 112},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD,
    }
    (out_dir / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n", encoding="utf-8")
    return out_dir


if __name__ == "__main__":
    target = build_tiny_clip(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT)
    size = sum(p.stat().st_size for p in target.iterdir())
    print(f"wrote {target} ({size / 1024:.0f} KiB)")
