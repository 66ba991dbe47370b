"""vlpet against the reference VL-PET code: golden cases computed by the official code on the shipped tiny backbones.
Forward (tests/golden/README.md, issue 11): encoder output, logits and loss within 2e-5 (or within 5e-5 in both
float32 and float64: the reference's own rounding), generated ids identical. Training (tests/golden-train/README.md,
issue 25): six optimizer steps of `vlpet train`'s optimizer, groups, schedule and clipping against the reference's."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from vlpet_cli.errors import VlpetError
from vlpet_cli.reference import import_reference_checkpoint, load_state_dict, map_keys

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "golden"
CASES = sorted(p.name for p in GOLDEN.iterdir() if p.is_dir())
TRAIN = ROOT / "tests" / "golden-train"
TRAIN_CASES = sorted(p.name for p in TRAIN.iterdir() if p.is_dir())
# float32 rounding: in this case the reference's own caption logits are 1.8e-5 off their exact value (vlpet in
# float64), vlpet's float32 ones 2.9e-5, both at one ill-conditioned token: it matches within the reference's rounding.
ROUNDING = {"tiny-t5-vl-adapter"}


def _script():
    spec = importlib.util.spec_from_file_location("check_reference", ROOT / "scripts" / "check_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def checker():
    return _script()


@pytest.fixture(scope="module")
def golden(tmp_path_factory, checker):
    """Full golden directories rebuilt from the small copies (frozen backbone restored from tiny-bart / tiny-t5)."""
    root = tmp_path_factory.mktemp("golden")
    return {name: checker.expand_test_copy(GOLDEN / name, root / name) for name in CASES}


@pytest.fixture(scope="module")
def trajectories(tmp_path_factory, checker):
    """Full training cases rebuilt from the small copies."""
    root = tmp_path_factory.mktemp("golden-train")
    return {name: checker.expand_test_copy(TRAIN / name, root / name) for name in TRAIN_CASES}


@pytest.mark.parametrize("case", CASES)
def test_golden_case_matches_the_reference(case, golden, checker, tmp_path):
    result = checker.check_case(golden[case], tmp_path)
    assert result["ok"], result
    for what in ("encoder", "logits", "loss"):
        assert result[what] <= (checker.ROUNDING if case in ROUNDING else checker.TOLERANCE), (case, result)
    assert result["match"] == (checker.ROUNDING_MATCH if case in ROUNDING else "float32"), result
    assert result["generated"] in (None, "identical"), result
    readme = json.loads((golden[case] / "README.json").read_text())
    if "generation" in readme:
        assert result["generated"] == "identical"


@pytest.mark.parametrize("case", TRAIN_CASES)
def test_six_training_steps_match_the_reference(case, trajectories, checker, tmp_path):
    """The learning rate of every step exact; loss, gradient norm and every trainable tensor after the steps within
    the case's tolerances; the same trainable tensors and decay groups as the reference's."""
    result = checker.check_trajectory(trajectories[case], tmp_path)
    tolerance = json.loads((trajectories[case] / "README.json").read_text())["tolerance"]
    assert result["ok"], result
    assert result["lr"] == "exact" and result["trainable"] == "same" and result["decay_groups"] == "same"
    assert result["params"] <= tolerance["params"] and result["checksums"] <= tolerance["params"]
    assert result["loss"] <= tolerance["loss"] and result["grad_norm"] <= tolerance["grad_norm"]


def _edited_copy(source: Path, where: Path, overrides: list[str]) -> Path:
    """A copy of a golden directory whose README adds vlpet overrides."""
    where.mkdir()
    for f in source.iterdir():
        (where / f.name).write_bytes(f.read_bytes())
    readme = json.loads((where / "README.json").read_text())
    readme["vlpet_overrides"] = [*readme["vlpet_overrides"], *overrides]
    (where / "README.json").write_text(json.dumps(readme))
    return where


@pytest.mark.parametrize("override,changed", [("train.optimizer=torch", "params"),
                                              ("train.decay_rule=corrected", "decay_groups")])
def test_torch_adamw_and_the_corrected_decay_rule_leave_the_reference_trajectory(override, changed, trajectories,
                                                                                  checker, tmp_path):
    """torch.optim.AdamW (eps after the bias correction, decay before the update) drifts by ~1e-3 in six steps, and
    the corrected decay rule exempts tensors the reference decays: both are opt-in for that reason."""
    case = _edited_copy(trajectories["tiny-bart-compacter"], tmp_path / "edited", [override])
    result = checker.check_trajectory(case, tmp_path / "work")
    assert not result["ok"]
    if changed == "params":
        assert result["params"] > 1e-4 and result["decay_groups"] == "same"
    else:
        assert result["decay_groups"] == "differs"


@pytest.mark.slow  # runs every golden case: 0.7 s
def test_checker_prints_one_line_per_case_and_fails_on_a_mismatch(golden, checker, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in golden["tiny-bart-lora"].iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    outputs = torch.load(broken / "outputs.pt", weights_only=True)
    outputs["vqa"]["logits"] = outputs["vqa"]["logits"] + 1e-3
    torch.save(outputs, broken / "outputs.pt")
    assert checker.main([str(golden["tiny-bart-lora"]), str(broken)]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    first, second = json.loads(lines[0]), json.loads(lines[1])
    assert first["golden"] == "tiny-bart-lora" and first["ok"] and first["generated"] is None
    assert first["kind"] == "forward" and first["match"] == "float32"
    assert not second["ok"] and second["logits"] > 5e-4 and second["match"] is None
    assert lines[-1] == "1/2 golden cases match"


@pytest.mark.parametrize("offset,match", [(3e-5, "within the reference's own rounding"), (6e-5, None)])
def test_forward_differences_beyond_float32_noise_need_float64_to_agree(offset, match, golden, checker, tmp_path):
    """Off by more than 2e-5 but at most 5e-5: matched only when vlpet in float64 is within 5e-5 too."""
    case = tmp_path / "off"
    case.mkdir()
    for f in golden["tiny-bart-lora"].iterdir():
        (case / f.name).write_bytes(f.read_bytes())
    outputs = torch.load(case / "outputs.pt", weights_only=True)
    outputs["vqa"]["logits"][0, 0, 0] += offset
    torch.save(outputs, case / "outputs.pt")
    result = checker.check_case(case, tmp_path / "work")
    assert result["match"] == match and result["ok"] == (match is not None)
    if match:  # float64 is run only for a case within 5e-5 in float32
        assert result["float64"]["logits"] == pytest.approx(offset, rel=0.2)
    else:
        assert "float64" not in result


@pytest.mark.slow  # runs golden cases: 0.6 s
def test_checker_runs_training_and_forward_cases_together(golden, trajectories, checker, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in trajectories["tiny-t5-vlpet-small"].iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    trajectory = torch.load(broken / "trajectory.pt", weights_only=True)
    trajectory["steps"][2]["lr"] += 1e-9
    torch.save(trajectory, broken / "trajectory.pt")
    assert checker.main([str(golden["tiny-bart-lora"]), str(trajectories["tiny-t5-vlpet-small"]), str(broken)]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    results = [json.loads(line) for line in lines[:-1]]
    assert [r["kind"] for r in results] == ["forward", "train", "train"]
    assert [r["ok"] for r in results] == [True, True, False] and results[2]["lr"] == "differs"
    assert set(results[1]) >= {"golden", "kind", "params", "loss", "grad_norm", "lr", "ok"}
    assert lines[-1] == "2/3 golden cases match"


def test_stripped_copy_restores_the_exact_checkpoint(golden, checker):
    state, _ = load_state_dict(golden["tiny-bart-vlpet-large-ownrows"] / "LAST.pth")
    kept, tails = checker.strip_checkpoint({f"module.{k}": v for k, v in state.items()}, "tiny-bart")
    assert tails, "the ownrows case's added vocabulary rows are the reference's own"
    full = checker.restore_checkpoint(kept, tails, [f"module.{k}" for k in state], "tiny-bart")
    assert all(torch.equal(full[f"module.{k}"], v) for k, v in state.items())


@pytest.mark.parametrize("case,preset", [("tiny-bart-compacter", "compacter"), ("tiny-bart-hyperformer", "hyperformer"),
                                         ("tiny-bart-lora", "lora"), ("tiny-bart-prompt-tuning", "prompt-tuning"),
                                         ("tiny-t5-vl-adapter", "vl-adapter"),
                                         ("tiny-t5-vlpet-large", "vlpet-large")])
def test_preset_is_picked_from_the_checkpoint(case, preset, golden, tmp_path):
    readme = json.loads((golden[case] / "README.json").read_text())
    report = import_reference_checkpoint(golden[case] / "LAST.pth", None, tmp_path / "a", readme["backbone"],
                                         readme["vlpet_overrides"])
    assert report["preset"] == preset


def test_mismatched_preset_names_what_the_checkpoint_holds(golden, tmp_path):
    with pytest.raises(VlpetError, match="holds modules: lora.*--preset lora"):
        import_reference_checkpoint(golden["tiny-bart-lora"] / "LAST.pth", "vl-adapter", tmp_path / "a", "tiny-bart")


def test_all_added_vocabulary_rows_are_carried(golden, tmp_path):
    from vlpet_cli.artifacts import load_adapter

    pth = golden["tiny-bart-vlpet-large-ownrows"] / "LAST.pth"
    readme = json.loads((pth.parent / "README.json").read_text())
    report = import_reference_checkpoint(pth, "vlpet-large", tmp_path / "a", "tiny-bart", readme["vlpet_overrides"])
    assert report["carried_vocab_rows"] == 200 and not report["warnings"]
    model, _, _ = load_adapter(tmp_path / "a")
    state, _ = load_state_dict(pth)
    assert torch.equal(model.backbone.get_input_embeddings().weight[1000:], state["model.shared.weight"][1000:])


def test_reference_key_names_map_for_every_t5_decoder_sublayer():
    names = [f"decoder.block.0.layer.{sub}.{word}_adapter.adapters.vqa.up_sampler.weight"
             for sub, word in (("0", "attn"), ("1", "enc_attn"), ("2", "ff"))]
    mapped = map_keys({n: torch.zeros(1) for n in names}, "t5", set())
    assert sorted(mapped.values) == ["pet.decoder_modules.decoder_0_cross.up.weight",
                                     "pet.decoder_modules.decoder_0_ffn.up.weight",
                                     "pet.decoder_modules.decoder_0_self.up.weight"]
    wrong = map_keys({"decoder.block.0.layer.2.attn_adapter.adapters.vqa.up_sampler.weight": torch.zeros(1)}, "t5",
                     set())
    assert wrong.unexpected


# ---- vl/projector.py -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case,override,hint", [
    ("tiny-bart-compacter", "pet.encoder.r=32", "set pet.encoder.r=16"),
    ("tiny-bart-lora", "pet.lora.r=4", "set pet.lora.r=8"),
    ("tiny-bart-prompt-tuning", "pet.prompt.mid_dim=32", "set pet.prompt.mid_dim=64"),
    ("tiny-bart-hyperformer", "pet.hyperformer.r=8", "set pet.hyperformer.r=16"),
    ("tiny-t5-vl-adapter", "pet.decoder.r=8", "set pet.decoder.r=16"),
    ("tiny-t5-vl-adapter", "pet.encoder.r=192", "set pet.encoder.r=16 "),
])
def test_wrong_size_names_the_override(case, override, hint, golden, tmp_path):
    readme = json.loads((golden[case] / "README.json").read_text())
    overrides = [o for o in readme["vlpet_overrides"] if o.split("=")[0] != override.split("=")[0]] + [override]
    with pytest.raises(VlpetError, match=hint.replace(".", r"\.")):
        import_reference_checkpoint(golden[case] / "LAST.pth", readme["vlpet_preset"], tmp_path / "a",
                                    readme["backbone"], overrides)


def test_every_size_override_is_named_at_once(golden, tmp_path):
    with pytest.raises(VlpetError, match=r"set pet\.decoder\.r=16 pet\.encoder\.r=16 \(the overrides to pass\)"):
        import_reference_checkpoint(golden["tiny-t5-vl-adapter"] / "LAST.pth", None, tmp_path / "a", "tiny-t5")


# ---- every method's names through the training checker ---------------------------------------------------------
OTHER_TASKS = ("gqa", "nlvr", "caption")  # the per-task copies the reference's trajectories alias to vqa's


def _one_copy(keys: dict) -> dict:
    """The keys a reference trajectory holds: one copy of a task-shared module (vqa's), the shared task table."""
    return {k: v for k, v in keys.items() if ".task_embed." not in k
            and ("task_to_embeddings" in k or not set(k.split(".")) & set(OTHER_TASKS))}


def synthetic_case(directory: Path, preset_name: str, backbone: str, overrides: list[str], batch_of) -> Path:
    """A training case in the golden format written by vlpet itself, under the reference's names as
    tests/test_reference_layouts.py writes them out by hand: start state, six steps of `vlpet_cli.optim`, the
    trainable set and the no-decay list the reference's rule gives those names. vlpet matches it by construction;
    it checks that the checker maps every method's names, trainable set and decay groups (issue 25: further cases
    of the format must match without changes to vlpet). `batch_of(task, inputs)` makes a vlpet batch."""
    from test_reference_layouts import reference_layout, trainable_layout

    from vlpet_cli.optim import build_optimizer, clip_gradients, schedule, total_updates
    from vlpet_cli.presets import resolve
    from vlpet_cli.vl.model import build_model

    family = backbone.removeprefix("tiny-")
    overrides = ["model.feat_dim=256", "train.epochs=3", *overrides]
    preset = resolve(preset_name, [*overrides, "model.dropout=0"], backbone=backbone)
    torch.manual_seed(0)
    model, _ = build_model(preset)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    directory.mkdir()
    torch.save(reference_layout(model, family, preset), directory / "LAST.pth")
    steps = torch.load(TRAIN / f"steps-{family}.pt", weights_only=True)
    torch.save(steps, directory / "steps.pt")
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(model, preset)
    scheduler = schedule(optimizer, preset.train, total_updates(10, preset.train))
    names = {"vqa": "vqa", "caption": "coco", "nlvr": "nlvr"}
    logged = []
    for batch in steps:
        lr = optimizer.param_groups[0]["lr"]
        loss = model(batch_of(names[batch["task"]], batch))
        loss.backward()
        norm = clip_gradients(params, 5.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state = _one_copy({k: v for keys in trainable_layout(model, family, preset).values() for k, v in keys.items()})
        logged.append({"task": batch["task"], "lr": lr, "loss": float(loss.detach()), "grad_norm": float(norm),
                       "checksums": {f"module.{k}": (float(v.double().sum()), float(v.double().abs().sum()))
                                     for k, v in state.items()},
                       **({"params": {f"module.{k}": v for k, v in state.items()}} if len(logged) in (1, 5) else {})})
    torch.save({"steps": logged, "aliases": {}, "full_steps": [2, 6]}, directory / "trajectory.pt")
    keys = _one_copy({k: v for keys in trainable_layout(model, family, preset).values() for k, v in keys.items()})
    readme = {"vlpet_preset": preset_name, "backbone": backbone, "vlpet_overrides": overrides,
              "batches_per_epoch": 10, "vlpet_task_names": names,
              "trainable": {f"module.{k}": list(v.shape) for k, v in keys.items()},
              "no_decay_trainable": [f"module.{k}" for k in keys if "bias" in k or "LayerNorm.weight" in k],
              "tolerance": {"params": 1e-6, "params_attention_k_proj_bias": 1e-5, "loss": 1e-6, "grad_norm": 1e-5,
                            "lr": 0.0}}
    (directory / "README.json").write_text(json.dumps(readme))
    return directory


SLOW = pytest.mark.slow  # 0.4 s each: `make test-fast` checks one method per backbone


@pytest.mark.parametrize("preset,backbone,overrides", [
    ("lora", "tiny-bart", ["pet.lora.r=8"]),
    pytest.param("bitfit", "tiny-bart", [], marks=SLOW),
    pytest.param("full-finetune", "tiny-bart", [], marks=SLOW),
    pytest.param("full-finetune", "tiny-t5", [], marks=SLOW),
    pytest.param("compacter", "tiny-t5", ["pet.encoder.r=16", "pet.decoder.r=16"], marks=SLOW),
    pytest.param("vl-adapter", "tiny-bart", ["pet.encoder.r=16", "pet.decoder.r=16"], marks=SLOW),
    ("hyperformer", "tiny-t5", ["pet.hyperformer.r=16", "pet.hyperformer.task_dim=32", "pet.hyperformer.layer_dim=32"]),
    pytest.param("vlpet-middley", "tiny-t5", ["pet.encoder.r=32", "pet.value.r=32"], marks=SLOW),
])
def test_every_methods_trajectory_reads_through_the_checker(preset, backbone, overrides, checker, tmp_path):
    case = synthetic_case(tmp_path / f"{preset}-{backbone}", preset, backbone, overrides, checker._batch)
    result = checker.check_trajectory(case, tmp_path / "work")
    assert result["trainable"] == "same" and result["decay_groups"] == "same" and result["lr"] == "exact", result
    assert result["ok"] and result["params"] <= 1e-6, result
