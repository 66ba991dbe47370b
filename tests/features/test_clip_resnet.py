"""CLIP ResNet grid features (issue 17): the tower against OpenAI's own outputs, architecture inferred from the keys,
loading and refusals, and `vlpet extract-features` -> `vlpet train` with a tiny tower in CLIP's key layout."""

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from vlpet_cli.cli import app
from vlpet_cli.errors import VlpetError
from vlpet_cli.features.clip_resnet import ModifiedResNet, ResNetSpec, build_resnet, infer_spec, load_resnet
from vlpet_cli.features.extract.images import grid_features, preprocess, to_pixels
from vlpet_cli.features.extract.images import load_model as load_vision_model
from vlpet_cli.features.kinds import IMAGE

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "golden-clip-rn"  # a copy of ../shared/golden-clip-rn (OpenAI's CLIP model code)
RN101 = ResNetSpec((3, 4, 23, 3), 64, 32, 512, 224)


def _checker():
    spec = importlib.util.spec_from_file_location("check_clip_resnet", ROOT / "scripts" / "check_clip_resnet.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def random_state(spec: ResNetSpec, seed: int = 0, text: bool = True) -> dict[str, torch.Tensor]:
    """A random tower (random BatchNorm statistics too) in a full CLIP checkpoint's key layout."""
    torch.manual_seed(seed)
    tower = ModifiedResNet(spec)
    with torch.no_grad():
        for module in tower.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.1)
        tower.attnpool.positional_embedding.normal_(0, 0.1)
    state = {f"visual.{k}": v.clone() for k, v in tower.state_dict().items()}
    if text:  # the text side of a full CLIP checkpoint is there and ignored
        state.update({"token_embedding.weight": torch.zeros(8, 4), "transformer.resblocks.0.ln_1.weight":
                      torch.ones(4), "logit_scale": torch.tensor(4.6)})
    return state


def write_golden(directory: Path, spec: ResNetSpec, seed: int) -> Path:
    """A golden directory of the checker's format, outputs computed by a tower built independently of the checker."""
    directory.mkdir(parents=True)
    state = random_state(spec, seed)
    save_file(state, str(directory / "clip_visual.safetensors"))
    tower = build_resnet(state, "test")
    pixels = torch.randn(2, 3, spec.resolution, spec.resolution, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        grid, pooled = tower(pixels)
    save_file({"pixel_values": pixels, "grid_features": grid.contiguous(), "attnpool_output": pooled},
              str(directory / "io.safetensors"))
    (directory / "README.json").write_text(json.dumps({"layers": spec.layers, "width": spec.width}))
    return directory


def test_golden_from_openai_clip_matches():
    checker = _checker()
    for case in sorted(p for p in GOLDEN.iterdir() if p.is_dir()):
        result = checker.check_dir(case)
        assert result["ok"] and result["grid"] <= 1e-4 and result["pooled"] <= 1e-4, result
    state = load_file(str(GOLDEN / "tiny-rn" / "clip_visual.safetensors"))
    readme = json.loads((GOLDEN / "tiny-rn" / "README.json").read_text())
    spec = infer_spec(state, "golden")
    assert (list(spec.layers), spec.width, spec.heads, spec.output_dim, spec.resolution) == (
        readme["layers"], readme["width"], readme["heads"], readme["output_dim"], readme["input_resolution"])


SHARED = ROOT.parent / "shared" / "golden-clip-rn"  # the original, where the checkout has ../shared (CI does)


@pytest.mark.skipif(not SHARED.is_dir(), reason="no ../shared/golden-clip-rn next to this checkout")
def test_shared_golden_directories_match(capsys):
    assert _checker().main([str(p) for p in sorted(SHARED.iterdir()) if p.is_dir()]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].endswith("match")


def test_fp16_compute_as_the_reference_ran_it_stays_close_to_fp32():
    """CUDA's default (fp16 convolutions, fp32 BatchNorm, as CLIP's convert_weights); run here on CPU."""
    from vlpet_cli.features.extract.images import load_resnet_model

    io = load_file(str(GOLDEN / "tiny-rn" / "io.safetensors"))
    vm = load_resnet_model(GOLDEN / "tiny-rn", "cpu", compute_dtype="float16")
    assert vm.module.conv1.weight.dtype == torch.float16 and vm.module.bn1.weight.dtype == torch.float32
    feats = grid_features(vm, io["pixel_values"])
    assert feats.dtype == torch.float32
    assert 0 < (feats - io["grid_features"]).abs().max() < 5e-3
    assert load_resnet_model(GOLDEN / "tiny-rn", "cpu").compute_dtype == torch.float32  # CPU default: fp32


@pytest.mark.slow  # builds and runs three ResNets: 0.6 s
def test_checker_on_other_depths_and_widths_and_a_corrupted_case(tmp_path, capsys):
    checker = _checker()
    cases = [write_golden(tmp_path / "rn-2131-w16", ResNetSpec((2, 1, 3, 1), 16, 8, 32, 224), 1),
             write_golden(tmp_path / "rn-1212-w8-160px", ResNetSpec((1, 2, 1, 2), 8, 4, 24, 160), 2)]
    assert checker.main([str(GOLDEN / "tiny-rn"), *map(str, cases)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == "3/3 match"
    assert [json.loads(line)["golden"] for line in lines[:-1]] == ["tiny-rn", "rn-2131-w16", "rn-1212-w8-160px"]
    io = load_file(str(cases[0] / "io.safetensors"))
    assert io["grid_features"].shape == (2, 49, 16 * 32)
    assert load_file(str(cases[1] / "io.safetensors"))["grid_features"].shape == (2, 25, 8 * 32)
    broken = tmp_path / "broken"
    shutil.copytree(cases[0], broken)
    io["grid_features"][0, 10, 3] += 1e-3
    save_file(io, str(broken / "io.safetensors"))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert checker.main([str(cases[0]), str(broken), str(empty)]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    results = [json.loads(line) for line in lines[:-1]]
    assert [r["ok"] for r in results] == [True, False, False] and lines[-1] == "1/3 match"
    assert 9e-4 < results[1]["grid"] < 1.1e-3 and "error" in results[2]


def test_rn101_shape_is_inferred_and_gives_49_by_2048():
    with torch.device("meta"):
        tower = ModifiedResNet(RN101)
        state = {f"visual.{k}": v for k, v in tower.state_dict().items()}
        spec = infer_spec(state, "rn101")
        assert spec == RN101 and spec.heads == 32 and spec.channels == 2048
        grid, pooled = ModifiedResNet(spec)(torch.empty(2, 3, 224, 224))
    assert grid.shape == (2, 49, 2048) and pooled.shape == (2, 512)
    assert 42e6 < sum(p.numel() for n, p in state.items() if "layer" in n or "conv" in n) < 46e6


@pytest.mark.slow
def test_rn101_checkpoint_with_random_weights_extracts_49_by_2048(tmp_path):
    path = tmp_path / "RN101.safetensors"
    save_file(random_state(RN101), str(path))
    vm = load_vision_model(path, "cpu")
    assert (vm.kind, vm.image_size, vm.grid, vm.dim) == ("resnet", 224, 7, 2048)
    image = _toy_images(1)
    feats = grid_features(vm, to_pixels([preprocess(p, 224, vm.mean, vm.std) for p in image.values()]))
    assert feats.shape == (1, 49, 2048) and torch.isfinite(feats).all()


def test_refusals_say_what_was_found(tmp_path):
    text_only = tmp_path / "text.safetensors"
    save_file({"token_embedding.weight": torch.zeros(2, 2), "transformer.resblocks.0.ln_1.weight": torch.ones(2)},
              str(text_only))
    with pytest.raises(VlpetError, match=r"no vision tower under 'visual\.'.*token_embedding \(1\), transformer"):
        load_resnet(text_only)
    vit = tmp_path / "vit.safetensors"
    save_file({"visual.class_embedding": torch.zeros(4), "visual.transformer.resblocks.0.ln_1.weight":
               torch.ones(4), "visual.conv1.weight": torch.zeros(4, 3, 2, 2)}, str(vit))
    with pytest.raises(VlpetError, match="is a ViT"):
        load_vision_model(vit, "cpu")
    odd = tmp_path / "odd.safetensors"
    save_file({"visual.stem.conv.weight": torch.zeros(2, 3, 3, 3)}, str(odd))
    with pytest.raises(VlpetError, match=r"no CLIP ResNet layout under 'visual\.'.*visual\.stem \(1\)"):
        load_vision_model(odd, "cpu")
    state = random_state(ResNetSpec((1, 1, 1, 1), 8, 4, 16, 224))
    del state["visual.layer3.0.conv2.weight"]
    with pytest.raises(VlpetError, match=r"missing \['layer3\.0\.conv2\.weight'\]"):
        build_resnet(state, "partial")
    pt = tmp_path / "RN101.pt"
    pt.write_bytes(b"not really")
    with pytest.raises(VlpetError, match="TorchScript archive.*--torchscript"):
        load_vision_model(pt, "cpu")
    with pytest.raises(VlpetError, match="cannot load it as a TorchScript archive"):
        load_vision_model(pt, "cpu", torchscript=True)


class _Clip(torch.nn.Module):
    """Stands for OpenAI's full CLIP model: its tower under `visual`."""

    def __init__(self, tower):
        super().__init__()
        self.visual = tower

    def forward(self, x):
        return self.visual.grid(x)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torchscript_archive_loads_only_when_asked(tmp_path):
    spec = ResNetSpec((1, 1, 1, 1), 8, 4, 16, 224)
    state = random_state(spec, 3, text=False)
    tower = build_resnet(state, "test")
    archive = tmp_path / "RN-tiny.pt"
    torch.jit.trace(_Clip(tower), torch.zeros(1, 3, 224, 224)).save(str(archive))
    vm = load_vision_model(archive, "cpu", torchscript=True)
    pixels = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(grid_features(vm, pixels), tower.grid(pixels), rtol=0, atol=1e-6)


def _toy_images(n: int | None = None) -> dict[str, Path]:
    from vlpet_cli.toy.images import toy_root

    paths = sorted((toy_root() / "COCO" / "images").iterdir())
    return {p.stem: p for p in paths[:n]}


@pytest.mark.slow
def test_tiny_tower_extract_resume_and_train(tmp_path):
    """A tiny random tower in CLIP's key layout -> (49, C) toy features through the CLI, resumable, then training."""
    from vlpet_cli.toy.images import toy_root

    spec = ResNetSpec((1, 1, 1, 1), 4, 2, 8, 224)  # C = 4 * 32 = 128
    ckpt = tmp_path / "tiny-rn"
    ckpt.mkdir()
    save_file(random_state(spec, 5), str(ckpt / "open_clip_model.safetensors"))
    root = tmp_path / "root"
    shutil.copytree(toy_root(), root, ignore=shutil.ignore_patterns("clip_features", "nlvr", "VG", "GQA"))
    out = root / "COCO" / "clip_features" / "data_clip_RN101_att.h5"
    runner = CliRunner()
    args = ["extract-features", "--images", str(root / "COCO" / "images"), "--model", str(ckpt), "--out", str(out),
            "--no-progress", "--batch-size", "64", "--device", "cpu"]
    first = runner.invoke(app, [*args, "--limit", "100"])
    assert first.exit_code == 0, first.output
    assert "100 written" in first.output
    n_images = len(list((root / "COCO" / "images").iterdir()))
    second = runner.invoke(app, args)
    assert second.exit_code == 0, second.output
    assert f"{n_images - 100} written, 100 already there" in second.output.replace("\n", " ")
    store = IMAGE.open(out)
    assert len(store) == n_images and store.shape == (49, 128) and store.dtype == "float16"
    attrs = store.attrs
    assert attrs["model"] == str((ckpt / "open_clip_model.safetensors").resolve())
    assert attrs["grid"] == [7, 7] and attrs["layer"] == -1 and attrs["image_size"] == 224
    one = next(iter(_toy_images(1).items()))
    vm = load_vision_model(ckpt, "cpu")
    expect = grid_features(vm, to_pixels([preprocess(one[1], 224, vm.mean, vm.std)]))[0].numpy()
    np.testing.assert_allclose(store.get(one[0]).astype(np.float32), expect, rtol=2e-3, atol=2e-3)
    bad_layer = runner.invoke(app, [*args, "--layer", "2"])
    assert bad_layer.exit_code == 2 and "last stage" in bad_layer.output
    train = runner.invoke(app, ["train", "--preset", "vlpet-small", "--task", "coco", "--data-root", str(root),
                                "--backbone", "tiny-bart", "--runs-dir", str(tmp_path / "runs"), "--name", "rn",
                                "model.feat_dim=128", "data.limit=16", "train.epochs=1", "train.batch_size=8",
                                "eval.every=0"])
    assert train.exit_code == 0, train.output
    adapter = json.loads((tmp_path / "runs" / "rn" / "adapter" / "vlpet_config.json").read_text())
    assert adapter["features"]["COCO"]["model"] == attrs["model"]
