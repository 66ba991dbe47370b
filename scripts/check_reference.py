"""Check vlpet against golden cases computed by the reference VL-PET code (issue 11).

    python scripts/check_reference.py [--float64] GOLDEN_DIR [GOLDEN_DIR ...]

Each directory holds the reference's `LAST.pth`, `inputs.pt`, `outputs.pt` and `README.json` (the vlpet preset,
backbone and overrides that match, and the reference's decoding settings). For each one this imports the checkpoint
as `vlpet import-reference` does, runs vlpet on the inputs and compares the encoder output, the logits, the loss and,
where the case holds them, the generated ids of every decoding setting and the NLVR2 predictions. It prints one JSON
line per directory and `N/M golden cases match`, and exits 1 when any case differs. `--float64` runs vlpet in double
precision: the differences left are then the reference's own float32 rounding alone.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # tiny models: a second thread only adds contention
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TOLERANCE = 2e-5  # float32: max |difference| of encoder outputs, logits and losses
CHOICES = ("true", "false")


def _max_diff(a, b) -> float:
    """Max |a - b|, or infinity when the shapes differ."""
    if tuple(a.shape) != tuple(b.shape):
        return float("inf")
    return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0


def _batch(task: str, inputs: dict) -> dict:
    """A vlpet batch from a golden task's inputs (vlpet task name, loss reduction and weights as in training)."""
    from vlpet_cli.tasks import get_task

    spec = get_task(task)
    return {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"],
            "labels": inputs["labels"], "vis_feats": inputs["vis_feats"], "task": spec.name,
            "loss_weights": inputs.get("scores") if spec.name == "vqa" else None, "loss_reduction": spec.loss_reduction}


def _generations(model, tokenizer, batch: dict, settings: dict, outputs: dict) -> list[bool]:
    """For each `generated_ids*` setting the case holds: are vlpet's ids identical to the reference's?"""
    import torch

    from transformers import GenerationConfig

    from vlpet_cli.config import GenerationSpec
    from vlpet_cli.vl.decoding import generation_kwargs

    same = []
    for key, kwargs in settings.items():
        if not key.startswith("generated_ids") or key not in outputs:
            continue
        spec = GenerationSpec(**kwargs)
        config = GenerationConfig(decoder_start_token_id=model.config.decoder_start_token_id,
                                  **generation_kwargs(spec, model.family, tokenizer))
        ids = model.generate(batch, generation_config=config)
        want = outputs[key]
        same.append(tuple(ids.shape) == tuple(want.shape) and bool(torch.equal(ids.cpu(), want)))
    return same


def _nlvr(model, tokenizer, batch: dict, rule: dict, outputs: dict) -> list[bool]:
    """vlpet's NLVR2 choice ('true' when its logit beats 'false') against the reference's `pred_true`."""
    if "pred_true" not in outputs:
        return []
    choice_ids = [tokenizer(c)["input_ids"] for c in CHOICES]
    logits = model.score_choices(batch, choice_ids)
    pred_true = (logits[:, 0] > logits[:, 1]).long().cpu()
    j = next(i for i, pair in enumerate(zip(*choice_ids)) if pair[0] != pair[1])
    want = [rule.get("true_id", choice_ids[0][j]), rule.get("false_id", choice_ids[1][j])]
    ids_ok = [c[j] for c in choice_ids] == want
    return [ids_ok and pred_true.tolist() == outputs["pred_true"].tolist()]


def check_case(directory: Path, work: Path, float64: bool = False) -> dict:
    """Import one golden case, run vlpet on its inputs and compare with the reference's outputs. With float64,
    vlpet computes in double precision, so only the reference's own float32 rounding is left in the differences."""
    import torch

    from vlpet_cli.artifacts import load_adapter
    from vlpet_cli.reference import import_reference_checkpoint

    directory = Path(directory)
    readme = json.loads((directory / "README.json").read_text())
    inputs = torch.load(directory / "inputs.pt", weights_only=True)
    outputs = torch.load(directory / "outputs.pt", weights_only=True)
    out = Path(work) / directory.name
    import_reference_checkpoint(directory / "LAST.pth", readme["vlpet_preset"], out, readme["backbone"],
                                readme.get("vlpet_overrides", []))
    model, tokenizer, _ = load_adapter(out)
    model.eval()
    if float64:
        model.double()
    generation = readme.get("generation", {}).get("reference_test_step_kwargs", {})
    diffs = {"encoder": 0.0, "logits": 0.0, "loss": 0.0}
    same: list[bool] = []
    with torch.no_grad():
        for task, task_inputs in inputs.items():
            batch = _batch(readme.get("vlpet_task_names", {}).get(task, task), task_inputs)
            want = outputs[task]
            enc, mask = model.encode(batch)
            diffs["encoder"] = max(diffs["encoder"], _max_diff(enc.last_hidden_state, want["encoder"]))
            logits = model.backbone(encoder_outputs=enc, attention_mask=mask, return_dict=True,
                                    decoder_input_ids=model.decoder_inputs(batch["labels"])).logits
            diffs["logits"] = max(diffs["logits"], _max_diff(logits, want["logits"]))
            diffs["loss"] = max(diffs["loss"], _max_diff(model(batch), want["loss"]))
            settings = generation.get(task, {})
            same += _generations(model, tokenizer, batch, settings, want)
            same += _nlvr(model, tokenizer, batch, settings, want)
    generated = None if not same else "identical" if all(same) else "differs"
    ok = all(d <= TOLERANCE for d in diffs.values()) and generated != "differs"
    return {"golden": directory.name, **diffs, "generated": generated, "ok": ok}


# ---- small copies for the test suite -----------------------------------------------------------------------
def _backbone_state(name: str) -> dict:
    """The state dict of vlpet's built backbone `name` (resized vocabulary, vlpet's added rows)."""
    from vlpet_cli import backbones

    model, _ = backbones.build(backbones.resolve(name), weights=True)
    return model.state_dict()


def _reference_of(key: str, backbone: dict):
    """The backbone tensor a reference key holds a copy of (the object-order table is the word embedding)."""
    if key.endswith("visual_embedding.obj_order_embedding.weight"):
        key = next(k for k in ("model.shared.weight", "shared.weight") if k in backbone)
    return backbone.get(key)


def strip_checkpoint(state: dict, backbone_name: str) -> tuple[dict, dict]:
    """(state without the tensors equal to the backbone's, {key: (first row, rows)} for tables that differ only in
    their trailing rows). `restore_checkpoint` undoes it, so a test suite ships only what the case trained."""
    import torch

    backbone = _backbone_state(backbone_name)
    kept, tails = {}, {}
    for key, tensor in state.items():
        ref = _reference_of(key.removeprefix("module."), backbone)
        if ref is None or ref.shape != tensor.shape:
            kept[key] = tensor
        elif torch.equal(ref, tensor):
            continue
        elif tensor.dim() == 2:
            rows = (ref != tensor).any(1).nonzero()
            first = int(rows[0])
            tails[key] = (first, tensor[first:].clone())
        else:
            kept[key] = tensor
    return kept, tails


def restore_checkpoint(kept: dict, tails: dict, keys: list[str], backbone_name: str) -> dict:
    """The full reference state dict (in `keys` order) from a stripped copy and vlpet's backbone."""
    backbone = _backbone_state(backbone_name)
    state = {}
    for key in keys:
        if key in kept:
            state[key] = kept[key]
            continue
        tensor = _reference_of(key.removeprefix("module."), backbone).clone()
        if key in tails:
            first, rows = tails[key]
            tensor[first:] = rows
        state[key] = tensor
    return state


def make_test_copies(src: Path, dst: Path, skip: tuple[str, ...] = ("tiny-bart-vlpet-large",)) -> None:
    """Write the small copies of the golden cases in `src` that the test suite checks (tests/golden/README.md)."""
    import shutil

    import torch

    dst.mkdir(parents=True, exist_ok=True)
    for case in sorted(p for p in src.iterdir() if p.is_dir() and p.name not in skip):
        readme = json.loads((case / "README.json").read_text())
        state = torch.load(case / "LAST.pth", weights_only=True)
        kept, tails = strip_checkpoint(state, readme["backbone"])
        (dst / case.name).mkdir(exist_ok=True)
        torch.save({"kept": kept, "tails": tails, "keys": list(state)}, dst / case.name / "LAST.stripped.pt")
        for name in ("outputs.pt", "README.json"):
            shutil.copy(case / name, dst / case.name / name)
        shutil.copy(case / "inputs.pt", dst / f"inputs-{readme['backbone'].removeprefix('tiny-')}.pt")


def expand_test_copy(copy: Path, out: Path) -> Path:
    """A full golden directory at `out` from a small copy in tests/golden (the reverse of `make_test_copies`)."""
    import shutil

    import torch

    readme = json.loads((copy / "README.json").read_text())
    stripped = torch.load(copy / "LAST.stripped.pt", weights_only=True)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(restore_checkpoint(stripped["kept"], stripped["tails"], stripped["keys"], readme["backbone"]),
               out / "LAST.pth")
    for name in ("outputs.pt", "README.json"):
        shutil.copy(copy / name, out / name)
    shutil.copy(copy.parent / f"inputs-{readme['backbone'].removeprefix('tiny-')}.pt", out / "inputs.pt")
    return out


def main(argv: list[str]) -> int:
    """Check every directory given; 0 when all match, 1 otherwise, 2 on bad usage."""
    from vlpet_cli.errors import VlpetError

    if argv[:1] == ["--make-test-copies"] and len(argv) == 3:
        make_test_copies(Path(argv[1]), Path(argv[2]))
        return 0
    if not argv:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    float64 = "--float64" in argv
    argv = [a for a in argv if a != "--float64"]
    matched = 0
    with tempfile.TemporaryDirectory(prefix="vlpet-golden-") as work:
        for directory in argv:
            try:
                result = check_case(Path(directory), Path(work), float64)
            except VlpetError as exc:
                result = {"golden": Path(directory).name, "encoder": None, "logits": None, "loss": None,
                          "generated": None, "ok": False, "error": str(exc)}
            matched += bool(result["ok"])
            print(json.dumps(result), flush=True)
    print(f"{matched}/{len(argv)} golden cases match")
    return 0 if matched == len(argv) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
