"""Check vlpet against golden cases computed by the reference VL-PET code (issues 11 and 25).

    python scripts/check_reference.py [--float64] GOLDEN_DIR [GOLDEN_DIR ...]

A directory holding `steps.pt` and `trajectory.pt` is a training case (../shared/golden-train/README.md): the
reference's `LAST.pth` is imported as `vlpet import-reference` does, with the README's preset, backbone and overrides,
and the K steps are run on the given batches (every dropout off) with the optimizer, parameter groups, schedule and
clipping of `vlpet train` (`vlpet_cli.optim`); after each step the learning rate (exact), the loss, the gradient norm
before clipping and every trainable tensor the trajectory holds are compared within the README's tolerances, and
so are the trainable set and the decay groups.

Any other directory is a forward case: `LAST.pth`, `inputs.pt`, `outputs.pt`, `README.json`. vlpet runs the inputs
and its encoder output, logits and loss are compared within 2e-5, with the generated ids of every decoding setting
and the NLVR2 predictions where the case holds them. A case off by more than 2e-5 but at most 5e-5 is run again in
float64, where only the reference's own float32 rounding is left: within 5e-5 there too, it matches "within the
reference's own rounding"; anything larger fails. `--float64` runs every forward case in float64 only.

One JSON line per directory, then `N/M golden cases match`; exit 1 when any case differs.
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
ROUNDING = 5e-5  # the reference's own float32 error at ill-conditioned tokens (measured in float64: 1.2-3.7e-5)
CHOICES = ("true", "false")
ROUNDING_MATCH = "within the reference's own rounding"


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


def _forward_diffs(model, tokenizer, readme: dict, inputs: dict, outputs: dict) -> tuple[dict, list[bool]]:
    """Max |difference| of encoder output, logits and loss over the tasks, and whether each generation matched."""
    import torch

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
    return diffs, same


def _import(directory: Path, work: Path, readme: dict, extra: tuple[str, ...] = ()):
    """(model, tokenizer, preset): the case's LAST.pth imported as `vlpet import-reference` does."""
    from vlpet_cli.artifacts import load_adapter
    from vlpet_cli.reference import import_reference_checkpoint

    out = Path(work) / directory.name
    import_reference_checkpoint(directory / "LAST.pth", readme["vlpet_preset"], out, readme["backbone"],
                                [*readme.get("vlpet_overrides", []), *extra])
    return load_adapter(out)


def check_case(directory: Path, work: Path, float64: bool = False) -> dict:
    """Import one forward case, run vlpet on its inputs and compare with the reference's outputs: within TOLERANCE
    in float32, or within ROUNDING in both float32 and float64 (float64 leaves only the reference's own rounding).
    float64=True compares in float64 only."""
    import torch

    directory = Path(directory)
    readme = json.loads((directory / "README.json").read_text())
    inputs = torch.load(directory / "inputs.pt", weights_only=True)
    outputs = torch.load(directory / "outputs.pt", weights_only=True)
    model, tokenizer, _ = _import(directory, work, readme)
    model.eval()
    if float64:
        model.double()
    diffs, same = _forward_diffs(model, tokenizer, readme, inputs, outputs)
    generated = None if not same else "identical" if all(same) else "differs"
    worst = max(diffs.values())
    result = {"golden": directory.name, "kind": "forward", **diffs, "generated": generated}
    match = "float64" if float64 else "float32"
    if worst > TOLERANCE and not float64 and worst <= ROUNDING:
        exact, _ = _forward_diffs(model.double(), tokenizer, readme, inputs, outputs)
        result["float64"] = exact
        if max(exact.values()) <= ROUNDING:
            match = ROUNDING_MATCH
    ok = generated != "differs" and (worst <= TOLERANCE or match == ROUNDING_MATCH)
    return {**result, "match": match if ok else None, "ok": ok}


# ---- training trajectories -------------------------------------------------------------------------------------
def is_trajectory(directory: Path) -> bool:
    """Whether a golden directory is a training case."""
    return (Path(directory) / "steps.pt").exists() and (Path(directory) / "trajectory.pt").exists()


def _vlpet_names(keys, family: str, backbone_keys: set[str]) -> dict[str, str | None]:
    """{reference key: the vlpet tensor it is or is part of (a down head, a task copy), None when it is none} for
    the keys that hold a tensor of their own (not the object-order copy of the word embedding)."""
    from vlpet_cli.pet.reference_names import match, vlpet_name

    out = {}
    for key in (k.removeprefix("module.") for k in keys):
        found = match(key, family)
        if found is not None and found[0].target is None:
            continue
        out[key] = vlpet_name(key, family) if found else f"backbone.{key}" if key in backbone_keys else None
    return out


def check_trajectory(directory: Path, work: Path) -> dict:
    """Replay one training case with vlpet's optimizer, groups, schedule and clipping; compare after every step."""
    import torch

    from vlpet_cli.optim import build_optimizer, clip_gradients, schedule, total_updates
    from vlpet_cli.pet.decay import no_decay_names
    from vlpet_cli.reference import map_keys, module_tensors

    directory = Path(directory)
    readme = json.loads((directory / "README.json").read_text())
    tolerance = readme["tolerance"]
    steps = torch.load(directory / "steps.pt", weights_only=True)
    trajectory = torch.load(directory / "trajectory.pt", weights_only=True)
    model, _, preset = _import(directory, work, readme, ("model.dropout=0",))  # the reference's --dropout 0
    for module in model.modules():  # and every other dropout (LoRA's), as the reference's run had them
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    model.train()
    family = model.pet.family
    backbone_keys = set(model.backbone.state_dict())
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    names = _vlpet_names(readme["trainable"], family, backbone_keys)
    trainable = "same" if set(names.values()) == set(params) else "differs"
    exempt = {names.get(k.removeprefix("module.")) for k in readme["no_decay_trainable"]}
    decay = "same" if exempt == no_decay_names(model, preset.train.decay_rule) else "differs"
    loose = {names[k] for k in names if "k_proj.bias" in k}  # true gradient 0: Adam amplifies float noise

    optimizer = build_optimizer(model, preset)
    scheduler = schedule(optimizer, preset.train, total_updates(readme["batches_per_epoch"], preset.train))
    diffs = {"params": 0.0, "params_attention_k_proj_bias": 0.0, "loss": 0.0, "grad_norm": 0.0, "checksums": 0.0}
    lr_exact = True
    for batch, want in zip(steps, trajectory["steps"]):
        lr_exact &= all(group["lr"] == want["lr"] for group in optimizer.param_groups)
        loss = model(_batch(readme["vlpet_task_names"].get(batch["task"], batch["task"]), batch))
        loss.backward()
        grads = [p.grad for p in params.values() if p.grad is not None]
        norm = clip_gradients(params.values(), preset.train.clip_grad_norm)
        if norm is None:
            norm = torch.nn.utils.get_total_norm(grads)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        diffs["loss"] = max(diffs["loss"], abs(float(loss.detach()) - want["loss"]))
        diffs["grad_norm"] = max(diffs["grad_norm"], abs(float(norm) - want["grad_norm"]))
        if "params" in want:
            state = {k.removeprefix("module."): v for k, v in want["params"].items()}
            mapped = map_keys(state, family, backbone_keys)
            tensors, _, _ = module_tensors(mapped, preset, directory / "trajectory.pt")
            tensors.update({f"backbone.{k}": v for k, v in mapped.backbone.items()})
            for name, tensor in tensors.items():
                which = "params_attention_k_proj_bias" if name in loose else "params"
                ours = params[name].detach() if name in params else None  # else: the trainable sets differ
                diffs[which] = max(diffs[which], _max_diff(ours, tensor) if ours is not None else float("inf"))
        else:  # sums of every tensor: |sum a - sum b| <= numel * max |a - b|, so their mean difference bounds it
            sums: dict[str, list[float]] = {}
            for key, (total, absolute) in want["checksums"].items():
                name = names.get(key.removeprefix("module."))
                if name in params:  # else: the trainable sets differ
                    sums.setdefault(name, [0.0, 0.0])
                    sums[name][0] += total
                    sums[name][1] += absolute
            for name, (total, absolute) in sums.items():
                p = params[name].detach().double()
                off = max(abs(float(p.sum()) - total), abs(float(p.abs().sum()) - absolute)) / p.numel()
                diffs["checksums"] = max(diffs["checksums"], off if name not in loose else 0.0)
    ok = (lr_exact and trainable == "same" and decay == "same" and diffs["loss"] <= tolerance["loss"]
          and diffs["grad_norm"] <= tolerance["grad_norm"] and diffs["params"] <= tolerance["params"]
          and diffs["checksums"] <= tolerance["params"]
          and diffs["params_attention_k_proj_bias"] <= tolerance.get("params_attention_k_proj_bias",
                                                                      tolerance["params"]))
    if not loose:
        del diffs["params_attention_k_proj_bias"]
    return {"golden": directory.name, "kind": "train", "params": diffs.pop("params"), "loss": diffs.pop("loss"),
            "grad_norm": diffs.pop("grad_norm"), "lr": "exact" if lr_exact else "differs", **diffs,
            "trainable": trainable, "decay_groups": decay, "ok": ok}


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


def _shared_name(kind: str, readme: dict) -> str:
    """The test copies' one file per backbone of what every case on it shares: 'inputs-bart.pt', 'steps-t5.pt'."""
    return f"{kind}-{readme['backbone'].removeprefix('tiny-')}.pt"


def make_test_copies(src: Path, dst: Path, skip: tuple[str, ...] = ("tiny-bart-vlpet-large",)) -> None:
    """Write the small copies of the golden cases in `src` that the test suite checks (tests/golden/README.md,
    tests/golden-train/README.md). `skip` names forward cases to leave out; a training case keeps its tensors after
    the last step only (the checksums of every step stay)."""
    import shutil

    import torch

    dst.mkdir(parents=True, exist_ok=True)
    for case in sorted(p for p in src.iterdir() if p.is_dir()):
        train = is_trajectory(case)
        if case.name in skip and not train:
            continue
        readme = json.loads((case / "README.json").read_text())
        state = torch.load(case / "LAST.pth", weights_only=True)
        kept, tails = strip_checkpoint(state, readme["backbone"])
        (dst / case.name).mkdir(exist_ok=True)
        torch.save({"kept": kept, "tails": tails, "keys": list(state)}, dst / case.name / "LAST.stripped.pt")
        shutil.copyfile(case / "README.json", dst / case.name / "README.json")
        if not train:
            shutil.copyfile(case / "outputs.pt", dst / case.name / "outputs.pt")
            shutil.copyfile(case / "inputs.pt", dst / _shared_name("inputs", readme))
            continue
        trajectory = torch.load(case / "trajectory.pt", weights_only=True)
        for step in trajectory["steps"][:-1]:
            step.pop("params", None)
        trajectory["full_steps"] = [len(trajectory["steps"])]
        torch.save(trajectory, dst / case.name / "trajectory.pt")
        shared = dst / _shared_name("steps", readme)
        if shared.exists() and shared.read_bytes() != (case / "steps.pt").read_bytes():
            raise ValueError(f"{case}: steps.pt differs from the other {readme['backbone']} cases'")
        shutil.copyfile(case / "steps.pt", shared)


def expand_test_copy(copy: Path, out: Path) -> Path:
    """A full golden directory at `out` from a small copy in tests/golden or tests/golden-train (the reverse of
    `make_test_copies`)."""
    import shutil

    import torch

    readme = json.loads((copy / "README.json").read_text())
    stripped = torch.load(copy / "LAST.stripped.pt", weights_only=True)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(restore_checkpoint(stripped["kept"], stripped["tails"], stripped["keys"], readme["backbone"]),
               out / "LAST.pth")
    shutil.copyfile(copy / "README.json", out / "README.json")
    if (copy / "trajectory.pt").exists():
        shutil.copyfile(copy / "trajectory.pt", out / "trajectory.pt")
        shutil.copyfile(copy.parent / _shared_name("steps", readme), out / "steps.pt")
    else:
        shutil.copyfile(copy / "outputs.pt", out / "outputs.pt")
        shutil.copyfile(copy.parent / _shared_name("inputs", readme), out / "inputs.pt")
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
            kind = "train" if is_trajectory(Path(directory)) else "forward"
            try:
                if kind == "train":
                    result = check_trajectory(Path(directory), Path(work))
                else:
                    result = check_case(Path(directory), Path(work), float64)
            except VlpetError as exc:
                result = {"golden": Path(directory).name, "kind": kind, "ok": False, "error": str(exc)}
            except (OSError, KeyError, ValueError, RuntimeError) as exc:  # a damaged or incomplete case directory
                result = {"golden": Path(directory).name, "kind": kind, "ok": False,
                          "error": f"{type(exc).__name__}: {exc}"}
            matched += bool(result["ok"])
            print(json.dumps(result), flush=True)
    print(f"{matched}/{len(argv)} golden cases match")
    return 0 if matched == len(argv) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
