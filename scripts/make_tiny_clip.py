"""Build the tiny CLIP vision model shipped in vlpet_cli/assets/tiny-clip.

112 px images, 16 px patches (7x7 = 49 patch tokens, the reference grid), hidden size 64, 2 layers, 2 heads,
built from a config with a fixed seed. The shipped model is then trained for about a minute on CPU, on freshly
drawn toy-world scenes (not the toy world's own images), to tag every patch token of its last layer with what
lies under the patch (colour, shape and size of the shape covering it, or none) and with what the whole scene shows
(background colour; colour, shape and size at the left, middle and right). Its grid features so carry the scene's
content, as real CLIP features carry a photo's, and the quick start can learn the visual tasks from them. The
linear tagging heads are thrown away.

With --projected it builds `tiny-clip-proj` instead, the toy videos' extractor: the same tower with CLIP's visual
projection to 512 (the size of ViT-B/32's image embedding, so toy video features are shaped like VALUE's), trained
on freshly drawn toy video frames to tag its projected image embedding with the frame's background and, for up
to two shapes (left-most first), the colour, the kind and the cell of a 4x4 grid it is centred in. One embedding
per frame so carries where the shapes are and what colour they have, which the toy video tasks ask about.

Usage: python scripts/make_tiny_clip.py [OUT_DIR] [--steps 1500] [--untrained] [--projected]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT_OUT = REPO / "vlpet_cli" / "assets" / "tiny-clip"
PROJECTED_OUT = REPO / "vlpet_cli" / "assets" / "tiny-clip-proj"
PROJECTION_DIM = 512
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
PATCH = 16
MIN_COVER = 48  # pixels of a 16x16 patch a shape must cover for the patch to be tagged with it


def patch_targets(scene) -> list[list[int]]:
    """Targets of every patch (row-major 7x7). Local: the colour, shape and size of the shape covering the
    patch (0 = none). Global, the same for every patch: background, per slot (left, middle, right) the colour,
    shape and size there (0 = empty)."""
    import numpy as np

    from vlpet_cli.toy import images as toy

    mask = np.asarray(toy.render_scene(scene, mask=True))
    grid = toy.IMAGE_SIZE // PATCH

    def tag(s) -> list[int]:
        if s is None:
            return [0, 0, 0]
        return [list(toy.COLORS).index(s.color) + 1, toy.SHAPES.index(s.kind) + 1, toy.SIZES.index(s.size) + 1]

    by_slot = {s.pos: s for s in scene.shapes}
    scene_tags = [list(toy.BACKGROUNDS).index(scene.background)]
    for pos in toy.POSITIONS:
        scene_tags += tag(by_slot.get(pos))
    rows = []
    for r in range(grid):
        for c in range(grid):
            block = mask[r * PATCH:(r + 1) * PATCH, c * PATCH:(c + 1) * PATCH]
            counts = np.bincount(block.ravel(), minlength=len(scene.shapes) + 1)
            top = int(counts[1:].argmax())
            rows.append(tag(scene.shapes[top] if counts[top + 1] >= MIN_COVER else None) + scene_tags)
    return rows


def toy_batch(rng: random.Random, n: int):
    """(pixel_values (n, 3, 112, 112), targets (n, 49, 13)) for n fresh random toy scenes."""
    import numpy as np
    import torch

    from vlpet_cli.features.extract.images import normalize
    from vlpet_cli.toy import images as toy

    pixels, targets = [], []
    for _ in range(n):
        scene = toy.random_scene(rng, "", "COCO")
        pixels.append(normalize(np.asarray(toy.render_scene(scene)), CLIP_MEAN, CLIP_STD))
        targets.append(patch_targets(scene))
    return torch.from_numpy(np.stack(pixels)), torch.tensor(targets)


def fit(model, heads, steps: int, lr: float, draw, loss_of, log) -> None:
    """The tagging loop both tiny CLIPs train with: AdamW, one-cycle lr, clipping 1; `draw()` gives a batch."""
    import torch
    from torch import nn

    params = list(model.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    start = time.perf_counter()
    model.train()
    for step in range(1, steps + 1):
        loss = loss_of(*draw())
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps:
            log(f"step {step}/{steps}  loss {loss.item():.3f}  {time.perf_counter() - start:.0f} s")
    model.eval()


def train(model, steps: int, seed: int, batch: int = 48, lr: float = 2e-3, log=print) -> None:
    """Train `model` to tag its patch tokens; logs the tagging accuracy on 256 held-out scenes."""
    import torch
    from torch import nn

    from vlpet_cli.toy import images as toy

    tag = [len(toy.COLORS) + 1, len(toy.SHAPES) + 1, len(toy.SIZES) + 1]
    classes = tag + [len(toy.BACKGROUNDS)] + tag * len(toy.POSITIONS)
    heads = nn.ModuleList(nn.Linear(model.config.hidden_size, k) for k in classes)
    rng = random.Random(f"tiny-clip:{seed}")
    held_out = toy_batch(random.Random(f"tiny-clip-eval:{seed}"), 256)

    def logits(pixels):
        tokens = model(pixel_values=pixels).last_hidden_state[:, 1:]
        return [h(tokens) for h in heads]

    def loss_of(pixels, targets):
        return sum(nn.functional.cross_entropy(out.flatten(0, 1), targets[..., k].flatten())
                   for k, out in enumerate(logits(pixels)))

    fit(model, heads, steps, lr, lambda: toy_batch(rng, batch), loss_of, log)
    with torch.no_grad():
        pixels, targets = held_out
        hits = [out.argmax(-1).eq(targets[..., k]).float().mean().item() for k, out in enumerate(logits(pixels))]
    log(f"held-out tagging accuracy: under the patch {sum(hits[:3]) / 3:.3f}, whole scene {sum(hits[3:]) / 10:.3f}")


def frame_batch(rng: random.Random, n: int):
    """(pixel_values (n, 3, 112, 112), targets (n, 9)) for n fresh random toy video frames."""
    import numpy as np
    import torch

    from vlpet_cli.features.extract.images import normalize
    from vlpet_cli.toy import videos as toy_video

    pixels, targets = [], []
    for _ in range(n):
        rgb, tags = toy_video.random_frame(rng)
        pixels.append(normalize(rgb, CLIP_MEAN, CLIP_STD))
        targets.append(tags)
    return torch.from_numpy(np.stack(pixels)), torch.tensor(targets)


def train_projected(model, steps: int, seed: int, batch: int = 48, lr: float = 3e-3, log=print) -> None:
    """Train `model` (with projection) to tag its image embedding; logs the accuracy on 256 held-out frames."""
    import torch
    from torch import nn

    from vlpet_cli.toy import videos as toy_video

    slot = [len(toy_video.COLORS) + 1, len(toy_video.SHAPES) + 1, toy_video.GRID + 1, toy_video.GRID + 1]
    classes = [len(toy_video.BACKGROUNDS)] + slot * 2
    heads = nn.ModuleList(nn.Linear(model.config.projection_dim, k) for k in classes)
    rng = random.Random(f"tiny-clip-proj:{seed}")
    held_out = frame_batch(random.Random(f"tiny-clip-proj-eval:{seed}"), 256)

    def logits(pixels):
        embeds = model(pixel_values=pixels).image_embeds
        return [h(embeds) for h in heads]

    def loss_of(pixels, targets):
        # where a shape is (column, row) is the hardest to pool into one token and what motion questions need
        return sum(nn.functional.cross_entropy(out, targets[:, k]) * (2 if k and (k - 1) % 4 >= 2 else 1)
                   for k, out in enumerate(logits(pixels)))

    fit(model, heads, steps, lr, lambda: frame_batch(rng, batch), loss_of, log)
    with torch.no_grad():
        pixels, targets = held_out
        outs = logits(pixels)
        hits = [out.argmax(-1).eq(targets[:, k]).float().mean().item() for k, out in enumerate(outs)]
    log("held-out tagging accuracy: background {:.3f}; first shape colour {:.3f}, shape {:.3f}, column {:.3f}, "
        "row {:.3f}; second shape colour {:.3f}, shape {:.3f}, column {:.3f}, row {:.3f}".format(*hits))


def sincos_positions(config):
    """(1 + grid*grid, hidden) 2-D sine-cosine position embeddings: half the channels encode the column, half the
    row, at geometrically spaced frequencies; the class token's row is zero."""
    import torch

    grid = config.image_size // config.patch_size
    quarter = config.hidden_size // 4
    freqs = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter))
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32),
                                indexing="ij")
    parts = []
    for coord in (cols.flatten(), rows.flatten()):
        angles = coord[:, None] * freqs[None, :]
        parts += [angles.sin(), angles.cos()]
    return torch.cat([torch.zeros(1, config.hidden_size), torch.cat(parts, 1)], 0)


def build_tiny_clip(out_dir: Path, seed: int = 0, steps: int = 0, log=print, projected: bool = False) -> Path:
    """Write config.json, model.safetensors and preprocessor_config.json of the tiny model to out_dir,
    trained for `steps` steps of patch tagging, or of frame tagging when `projected` (0: random weights)."""
    import torch
    import transformers
    from transformers import CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection

    transformers.utils.logging.disable_progress_bar()

    config = CLIPVisionConfig(
        image_size=112, patch_size=PATCH, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=128, projection_dim=PROJECTION_DIM if projected else 64,
    )
    torch.manual_seed(seed)
    model = (CLIPVisionModelWithProjection if projected else CLIPVisionModel)(config).eval()
    if projected:
        # stock init (random, std 0.02) leaves where a patch is too faint for the class token to pool it into one
        # embedding; 2-D sine-cosine position embeddings (as in MAE) make a patch's place linear to read off
        with torch.no_grad():
            model.vision_model.embeddings.position_embedding.weight.copy_(sincos_positions(config))
    if steps:
        (train_projected if projected else train)(model, steps, seed, log=log)
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
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?", type=Path, default=None,
                        help=f"default: {DEFAULT_OUT.name}, or {PROJECTED_OUT.name} with --projected")
    parser.add_argument("--steps", type=int, default=1500, help="tagging training steps")
    parser.add_argument("--untrained", action="store_true", help="keep the random weights")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--projected", action="store_true",
                        help="build tiny-clip-proj (with a 512-d projection) for the toy videos")
    args = parser.parse_args()
    out = args.out or (PROJECTED_OUT if args.projected else DEFAULT_OUT)
    target = build_tiny_clip(out, args.seed, 0 if args.untrained else args.steps, projected=args.projected)
    size = sum(p.stat().st_size for p in target.iterdir())
    print(f"wrote {target} ({size / 1024:.0f} KiB)")
