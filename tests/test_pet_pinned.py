"""Every preset keeps its parameter names, shapes and seeded initial values (saved adapters, checkpoints and
`vlpet import-reference` rely on the names; the quick start numbers on the initial values).

The fixture was written from the code before the PET methods moved into one file each; regenerate it only for a
deliberate change: VLPET_PIN_WRITE=1 python tests/test_pet_pinned.py.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from vlpet_cli.presets import resolve
from vlpet_cli.vl.model import build_model

FIXTURE = Path(__file__).parent / "fixtures" / "pet_pinned.json"
BACKBONES = ("tiny-bart", "tiny-t5")


def fingerprint(preset: str, backbone: str) -> dict:
    """sha256 of the sorted 'name shape' lines of the whole model, and [sum, sum |x|] of every added tensor."""
    torch.manual_seed(0)
    model, _ = build_model(resolve(preset, backbone=backbone), weights=True)
    lines = sorted(f"{n} {tuple(p.shape)} {p.requires_grad}" for n, p in model.named_parameters())
    added = {n: [round(p.double().sum().item(), 6), round(p.double().abs().sum().item(), 6)]
             for n, p in sorted(model.named_parameters()) if n.startswith("pet.")}
    return {"names": hashlib.sha256("\n".join(lines).encode()).hexdigest(), "count": len(lines), "added": added}


def _pinned() -> dict:
    return json.loads(FIXTURE.read_text()) if FIXTURE.exists() else {b: {} for b in BACKBONES}


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("preset", sorted(_pinned()[BACKBONES[0]]))
def test_names_shapes_and_initial_values_are_pinned(preset, backbone):
    want = _pinned()[backbone][preset]
    got = fingerprint(preset, backbone)
    assert (got["names"], got["count"]) == (want["names"], want["count"]), f"{preset} on {backbone}: names changed"
    assert sorted(got["added"]) == sorted(want["added"])
    for name, (total, absolute) in want["added"].items():
        assert got["added"][name] == pytest.approx([total, absolute], rel=1e-5, abs=1e-6), name


def write_fixture() -> None:
    """Pin every preset as the code builds it now."""
    from vlpet_cli.presets import list_presets

    FIXTURE.parent.mkdir(exist_ok=True)
    FIXTURE.write_text(json.dumps({b: {p: fingerprint(p, b) for p in list_presets()} for b in BACKBONES},
                                  indent=1, sort_keys=True) + "\n")


if __name__ == "__main__" and os.environ.get("VLPET_PIN_WRITE") == "1":  # pragma: no cover
    write_fixture()
