"""CLIP's ResNet vision tower (ModifiedResNet: RN50, RN101, RN50x4, ...) in plain torch, built from a state dict.

The paper's features are CLIP RN101 grid features: the last residual stage's output before attention pooling,
2048x7x7 at 224 px, flattened row-major to (49, 2048) (spec/pipeline.md §2.1). transformers has no CLIP ResNet and
open_clip needs torchvision, so the tower is written here from the architecture CLIP describes:

- stem: three 3x3 convolutions (stride 2, 1, 1; widths w/2, w/2, w) with BatchNorm + ReLU, then a 2x2 average pool;
- four stages of bottleneck blocks (1x1, 3x3, 1x1, expansion 4) with widths w, 2w, 4w, 8w; a stride-s block
  average-pools by s before its last convolution, and its shortcut average-pools by s before a 1x1 conv + BN;
- an attention pool: the mean token joins the flattened grid, positional embeddings are added, and one
  multi-head attention with the mean token as its only query gives the pooled embedding.

The architecture is read off the checkpoint as OpenAI's loader does: blocks per stage from the
`visual.layerN.<block>.*` keys, width from `visual.layer1.0.conv1.weight`, heads = width * 32 / 64, output size from
`visual.attnpool.c_proj`, resolution from the attention pool's positional embedding. Weights come from a
safetensors file with the tower under `visual.` (or a directory holding one), or, only when asked for, from
OpenAI's TorchScript archive (`RN101.pt`). Nothing is downloaded.
"""

from __future__ import annotations

import math
import re
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from vlpet_cli.errors import VlpetError

PREFIX = "visual."
EXPANSION = 4
STAGES = 4
_BLOCK_KEY = re.compile(r"^visual\.layer([1-4])\.(\d+)\.")
_VIT_MARKERS = ("visual.transformer.", "visual.class_embedding")


@dataclass(frozen=True)
class ResNetSpec:
    """The shape of a ModifiedResNet tower, as inferred from its state dict."""

    layers: tuple[int, int, int, int]
    width: int
    heads: int
    output_dim: int
    resolution: int

    @property
    def grid(self) -> int:
        """Side of the last stage's feature map (the input is downsampled 32x)."""
        return self.resolution // 32

    @property
    def channels(self) -> int:
        """Channels of the last stage's output: the grid features' size (2048 for RN50/RN101)."""
        return self.width * 8 * EXPANSION

    def describe(self) -> str:
        """E.g. 'CLIP ResNet 3-4-23-3, width 64, 224 px, grid 7x7x2048' (RN101)."""
        return (f"CLIP ResNet {'-'.join(map(str, self.layers))}, width {self.width}, {self.resolution} px, "
                f"grid {self.grid}x{self.grid}x{self.channels}")


# ------------------------------------------------------------------------------------------------------------
# The modules (attribute names follow CLIP's state-dict keys, so a checkpoint loads as it is)
# ------------------------------------------------------------------------------------------------------------

class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> (avg-pool by stride) -> 1x1 (x4 channels), with a pooled 1x1 projection shortcut."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.stride = stride
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * EXPANSION, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * EXPANSION)
        self.downsample: nn.Sequential | None = None
        if stride > 1 or inplanes != planes * EXPANSION:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes * EXPANSION, 1, bias=False),
                                            nn.BatchNorm2d(planes * EXPANSION))

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, self.stride) if self.stride > 1 else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self._pool(out)))
        shortcut = x if self.downsample is None else self.downsample(self._pool(x))
        return F.relu(out + shortcut)


class AttentionPool(nn.Module):
    """Multi-head attention of the mean token over [mean token; grid tokens] with learned positions."""

    def __init__(self, grid: int, embed_dim: int, heads: int, output_dim: int):
        super().__init__()
        self.heads = heads
        self.positional_embedding = nn.Parameter(torch.zeros(grid * grid + 1, embed_dim))
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.flatten(2).transpose(1, 2)  # (B, HW, C), row-major
        tokens = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)
        tokens = tokens + self.positional_embedding.to(tokens.dtype)
        b, n, c = tokens.shape
        d = c // self.heads
        q = self.q_proj(tokens[:, :1]).view(b, 1, self.heads, d).transpose(1, 2)
        k = self.k_proj(tokens).view(b, n, self.heads, d).transpose(1, 2)
        v = self.v_proj(tokens).view(b, n, self.heads, d).transpose(1, 2)
        weights = torch.softmax((q * d ** -0.5) @ k.transpose(-2, -1), dim=-1)
        return self.c_proj((weights @ v).transpose(1, 2).reshape(b, c))


class ModifiedResNet(nn.Module):
    """CLIP's ResNet vision tower; `grid(x)` gives the paper's features, `forward(x)` the pooled embedding."""

    def __init__(self, spec: ResNetSpec):
        super().__init__()
        self.spec = spec
        w = spec.width
        self.conv1 = nn.Conv2d(3, w // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w // 2)
        self.conv2 = nn.Conv2d(w // 2, w // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(w // 2)
        self.conv3 = nn.Conv2d(w // 2, w, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(w)
        inplanes = w
        for i, blocks in enumerate(spec.layers):
            planes = w * 2 ** i
            stage = [Bottleneck(inplanes, planes, 1 if i == 0 else 2)]
            stage += [Bottleneck(planes * EXPANSION, planes) for _ in range(blocks - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
            inplanes = planes * EXPANSION
        self.attnpool = AttentionPool(spec.grid, inplanes, spec.heads, spec.output_dim)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's output (B, C, H, W), before attention pooling."""
        x = x.to(self.conv1.weight.dtype)
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.avg_pool2d(F.relu(self.bn3(self.conv3(x))), 2)
        for i in range(STAGES):
            x = getattr(self, f"layer{i + 1}")(x)
        return x

    def grid(self, x: torch.Tensor) -> torch.Tensor:
        """Grid features (B, H*W, C), row-major (index = row * W + col)."""
        return self.feature_map(x).flatten(2).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(grid features (B, H*W, C), attention-pooled embedding (B, output_dim))."""
        fmap = self.feature_map(x)
        return fmap.flatten(2).transpose(1, 2), self.attnpool(fmap)


# ------------------------------------------------------------------------------------------------------------
# Inferring the architecture and loading checkpoints
# ------------------------------------------------------------------------------------------------------------

def _prefixes(keys: list[str], limit: int = 8) -> str:
    """The most common top-level key prefixes of a state dict, for messages: 'visual.conv1 (1), text (12), ...'."""
    counts = Counter(".".join(k.split(".")[:2]) if k.startswith(PREFIX) else k.split(".")[0] for k in keys)
    shown = ", ".join(f"{p} ({n})" for p, n in counts.most_common(limit))
    return shown + (f", ... ({len(counts) - limit} more)" if len(counts) > limit else "") if counts else "no keys"


def is_resnet_state(state: dict) -> bool:
    """Whether a state dict holds a CLIP ResNet tower under `visual.`."""
    return f"{PREFIX}layer1.0.conv1.weight" in state and f"{PREFIX}attnpool.positional_embedding" in state


def infer_spec(state: dict, source: str) -> ResNetSpec:
    """The tower's shape from its keys and tensor shapes; a refusal that says what was found otherwise."""
    keys = list(state)
    if not is_resnet_state(state):
        if any(k.startswith(m) for k in keys for m in _VIT_MARKERS):
            raise VlpetError(f"{source}: its vision tower is a ViT (found {_prefixes(keys)}), not a CLIP ResNet; "
                             f"for ViT features pass a transformers CLIP model directory (config.json + weights)")
        if any(k.startswith("visual.trunk.") for k in keys):
            raise VlpetError(f"{source}: its vision tower is a timm trunk (found {_prefixes(keys)}), not CLIP's "
                             f"ModifiedResNet key layout; use OpenAI's RN101.pt (--torchscript) or its conversion "
                             f"to safetensors")
        found = "no vision tower under 'visual.'" if not any(k.startswith(PREFIX) for k in keys) else \
            "no CLIP ResNet layout under 'visual.'"
        raise VlpetError(f"{source}: {found} (the top-level key prefixes are: {_prefixes(keys)}); --model needs a "
                         f"CLIP checkpoint whose ResNet tower is under 'visual.' (visual.conv1..3, visual.layer1-4, "
                         f"visual.attnpool), or a transformers CLIP model directory")
    blocks: dict[int, set[int]] = {i: set() for i in range(1, STAGES + 1)}
    for key in keys:
        match = _BLOCK_KEY.match(key)
        if match:
            blocks[int(match.group(1))].add(int(match.group(2)))
    for stage, ids in blocks.items():
        if not ids or ids != set(range(len(ids))):
            raise VlpetError(f"{source}: visual.layer{stage} has blocks {sorted(ids)}, not 0..N-1; the checkpoint "
                             f"is incomplete or not a CLIP ResNet (found {_prefixes(keys)})")
    try:
        width = int(state[f"{PREFIX}layer1.0.conv1.weight"].shape[0])
        output_dim = int(state[f"{PREFIX}attnpool.c_proj.weight"].shape[0])
        positions = int(state[f"{PREFIX}attnpool.positional_embedding"].shape[0])
    except KeyError as exc:
        raise VlpetError(f"{source}: {exc.args[0]} is missing; the checkpoint is not a complete CLIP ResNet tower "
                         f"(found {_prefixes(keys)})") from None
    grid = math.isqrt(positions - 1)
    if grid * grid + 1 != positions:
        raise VlpetError(f"{source}: visual.attnpool.positional_embedding has {positions} rows, not a square grid "
                         f"plus one; not a CLIP ResNet tower")
    layers = tuple(len(blocks[i]) for i in range(1, STAGES + 1))
    return ResNetSpec(layers, width, width * 32 // 64, output_dim, grid * 32)  # type: ignore[arg-type]


def build_resnet(state: dict, source: str) -> ModifiedResNet:
    """A fp32 ModifiedResNet in eval mode holding `state` (keys under `visual.`); strict on every tensor."""
    spec = infer_spec(state, source)
    model = ModifiedResNet(spec)
    tower = {k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)}
    own = model.state_dict()
    missing = [k for k in own if k not in tower and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in tower if k not in own]
    if missing or unexpected:
        raise VlpetError(f"{source}: the CLIP ResNet tower ({spec.describe()}) does not match its checkpoint: "
                         f"missing {missing[:4]} ({len(missing)}), unexpected {unexpected[:4]} ({len(unexpected)})")
    for key, tensor in tower.items():
        if tuple(tensor.shape) != tuple(own[key].shape):
            raise VlpetError(f"{source}: visual.{key} has shape {tuple(tensor.shape)}, but a {spec.describe()} "
                             f"tower needs {tuple(own[key].shape)}; the checkpoint is damaged or not a CLIP ResNet")
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in tower.items()}, strict=False)
    return model.float().eval()


def resnet_checkpoint(path: Path) -> Path | None:
    """The safetensors file of a CLIP ResNet checkpoint: a file, or in a directory its one .safetensors file (or
    the one of several that holds a ResNet tower)."""
    path = Path(path)
    if path.is_file():
        return path if path.suffix == ".safetensors" else None
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    if len(files) > 1:
        files = [f for f in files if holds_resnet(f)]
    return files[0] if len(files) == 1 else None


def holds_resnet(path: Path) -> bool:
    """Whether a safetensors file holds a CLIP ResNet tower (reads the header only)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
    except Exception:  # noqa: BLE001 - not a readable safetensors file: not ours to claim
        return False
    return is_resnet_state(dict.fromkeys(keys))


def read_state(path: Path, torchscript: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of a CLIP checkpoint: safetensors, or (torchscript=True) OpenAI's TorchScript archive on CPU."""
    path = Path(path)
    if not path.is_file():
        raise VlpetError(f"{path}: checkpoint file not found")
    if torchscript:
        try:
            with warnings.catch_warnings():  # torch 2.x marks TorchScript deprecated; OpenAI's archive is one
                warnings.simplefilter("ignore", DeprecationWarning)
                archive = torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:  # noqa: BLE001 - any load failure is the user's file
            raise VlpetError(f"{path}: cannot load it as a TorchScript archive ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''}); --torchscript is for OpenAI's "
                             f"original RN101.pt, other files must be safetensors") from None
        return {k: v.detach() for k, v in archive.state_dict().items()}
    if path.suffix != ".safetensors":
        raise VlpetError(f"{path}: not a safetensors file; --model takes a transformers CLIP model directory or a "
                         f"CLIP ResNet checkpoint in safetensors. OpenAI's RN101.pt is a TorchScript archive (code, "
                         f"not plain tensors): pass --torchscript to load it, or convert it once to safetensors")
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - a damaged header or short data
        raise VlpetError(f"{path}: not a readable safetensors file ({exc}); download or convert it again") from None


def load_resnet(path: Path, torchscript: bool = False) -> ModifiedResNet:
    """A CLIP ResNet tower from a checkpoint file (or a directory holding one safetensors file)."""
    path = Path(path)
    file = path if torchscript or path.is_file() else resnet_checkpoint(path)
    if file is None:
        found = sorted(p.name for p in path.iterdir())[:6] if path.is_dir() else "no such file or directory"
        raise VlpetError(f"{path}: no single .safetensors CLIP checkpoint here (found {found}); pass the checkpoint "
                         f"file itself")
    return build_resnet(read_state(file, torchscript), str(file))
