"""The video section of presets (spec modules §3-4, pipeline §4): applied when every task is a video task, merged
with a preset's own `video:`, T5 on top; `video.<key>` overrides; `presets show --task`; `params --task tvqa`."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from vlpet_cli.cli import app
from vlpet_cli.data.loading import feature_kind
from vlpet_cli.errors import VlpetError
from vlpet_cli.inference import generation_spec
from vlpet_cli.pet.budget import budget
from vlpet_cli.presets import VIDEO_DEFAULTS, list_presets, load_raw, resolve
from vlpet_cli.tasks import TASKS, CocoTask
from vlpet_cli.vl.model import build_model

VIDEO = ["tvqa", "how2qa", "tvc", "yc2c"]


@pytest.fixture(autouse=True)
def video_tasks(monkeypatch):
    """The VALUE tasks of the task table; stand-ins (feature_kind 'video') where the table has none yet."""
    for name in VIDEO:
        if name not in TASKS:
            monkeypatch.setitem(TASKS, name, type(f"Fake{name}", (CocoTask,),
                                                  {"name": name, "aliases": (), "feature_kind": "video"}))


def video(name: str, *overrides: str, backbone: str = "bart-base", tasks=VIDEO):
    return resolve(name, [f"data.tasks=[{','.join(tasks)}]", *overrides], backbone, task_kind=feature_kind)


# The reference's video-text settings (spec modules §4: video-text scripts; pipeline §4: video batch = B).
@pytest.mark.parametrize("name", list_presets())
def test_every_preset_gets_the_video_settings_on_bart(name):
    p = video(name)
    assert (p.model.feat_dim, p.model.n_boxes, p.data.video.frames, p.train.batch_size) == (512, 64, 64, 50)
    lr, epochs = (3e-5, 7) if name == "full-finetune" else (7e-4, 20)
    assert p.train.lr == pytest.approx(lr) and p.train.epochs == epochs
    assert {t: (g.num_beams, g.max_length) for t in VIDEO for g in [generation_spec(p, t, "bart")]} == {
        "tvqa": (4, 20), "how2qa": (4, 20), "tvc": (5, 20), "yc2c": (5, 20)}
    assert p.video is None  # applied, like the T5 section
    image = resolve(name, [], "bart-base", task_kind=feature_kind)
    assert p.pet == image.pet or name == "hyperformer"  # module sizes: the video scripts use the image ones
    if name == "hyperformer":
        assert p.pet.hyperformer.tasks == VIDEO


@pytest.mark.parametrize("name", [n for n in list_presets() if "t5" in load_raw(n).get("families", ["t5"])])
def test_t5_video_runs_keep_the_t5_section_with_the_video_batch(name):
    p = video(name, backbone="t5-base")
    t5_image = resolve(name, [], "t5-base")
    assert (p.model.feat_dim, p.model.n_boxes, p.train.batch_size) == (512, 64, 30)
    assert p.train.lr == pytest.approx(t5_image.train.lr if name != "full-finetune" else 3e-5)
    assert generation_spec(p, "tvqa", "t5").num_beams == 1 and generation_spec(p, "tvc", "t5").num_beams == 5
    assert p.pet == t5_image.pet or name == "hyperformer"


def test_image_and_mixed_runs_are_unchanged():
    for tasks in (["coco"], ["vqa", "gqa", "nlvr", "coco"], ["coco", "tvqa"]):
        p = video("vlpet-small", tasks=tasks)
        plain = resolve("vlpet-small", [f"data.tasks=[{','.join(tasks)}]"], "bart-base")
        assert p == plain and p.model.feat_dim == 2048 and p.train.batch_size == 500
    assert resolve("vlpet-small", ["data.tasks=[tvqa]"], "bart-base").model.feat_dim == 2048  # no task_kind given


def test_preset_tasks_decide_too(tmp_path):
    raw = dict(load_raw("vlpet-small"), data={"tasks": ["tvqa", "tvc"]})
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert resolve(str(path), [], "bart-base", task_kind=feature_kind).model.feat_dim == 512


def test_video_overrides_apply_to_video_runs_only():
    assert video("vlpet-small", "video.train.lr=5e-4", "train.lr=1e-3").train.lr == pytest.approx(5e-4)
    image = resolve("vlpet-small", ["video.train.lr=5e-4"], "bart-base", task_kind=feature_kind)
    assert image.train.lr == pytest.approx(1e-3) and image.video == {"train": {"lr": 5e-4}}
    t5 = video("vlpet-small", "video.t5.train.batch_size=8", "t5.train.batch_size=9", backbone="t5-base")
    assert t5.train.batch_size == 8
    assert video("vlpet-small", "video.t5.train.batch_size=8").train.batch_size == 50
    assert video("vlpet-small", "data.video.mask_padding=true").data.video.mask_padding is True


def test_video_section_keys_are_checked():
    with pytest.raises(VlpetError, match=r"unknown key 'video.train.lrr'.*did you mean 'lr'"):
        video("vlpet-small", "video.train.lrr=1")
    with pytest.raises(VlpetError, match=r"unknown key 'video.t5.model.feat_dimm'"):
        resolve("vlpet-small", ["video.t5.model.feat_dimm=1"], "bart-base")
    for section in (VIDEO_DEFAULTS, {k: v for k, v in VIDEO_DEFAULTS["t5"].items()}):
        assert set(section) <= {"model", "train", "eval", "data", "pet", "t5"}


def test_presets_show_with_a_video_task():
    result = CliRunner().invoke(app, ["presets", "show", "vlpet-large", "--task", "tvqa,tvc"])
    assert result.exit_code == 0, result.output
    shown = yaml.safe_load(result.output)
    assert shown["model"]["feat_dim"] == 512 and shown["train"]["lr"] == pytest.approx(7e-4)
    assert shown["data"]["tasks"] == ["tvqa", "tvc"]
    bad = CliRunner().invoke(app, ["presets", "show", "vlpet-large", "--task", "tvqaa"])
    assert bad.exit_code == 2 and "unknown task 'tvqaa'" in bad.output


# spec modules §3: the 512-d projector is 512*768+768 (W_f) + 2*768 (LN) + 5*768+768 (W_p) + 2*768 (LN)
# + 2*768 (E_img) = 403,200; §6.3's BART rows carry the 2048-d projector (1,582,848), so the video model has
# 1,179,648 parameters fewer in both the trainable count and the total.
VIDEO_PROJECTOR = 403_200
DROP = 1_582_848 - VIDEO_PROJECTOR
VIDEO_ROWS = {"vlpet-small": (4_291_020 - DROP, 143_845_068 - DROP, 2.18),
              "vlpet-large": (6_052_416 - DROP, 145_606_464 - DROP, 3.37)}


@pytest.mark.parametrize("name", sorted(VIDEO_ROWS))
def test_params_reports_the_video_model(name):
    result = CliRunner().invoke(app, ["params", "--preset", name, "--task", "tvqa", "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    groups = {g["group"]: g for g in info["groups"]}
    assert groups["visual projector"] == {"group": "visual projector", "trainable": VIDEO_PROJECTOR,
                                          "total": VIDEO_PROJECTOR}
    trainable, total, percent = VIDEO_ROWS[name]
    assert (info["trainable"], info["total"], info["feat_dim"], info["tasks"]) == (trainable, total, 512, ["tvqa"])
    assert round(info["percent"], 2) == percent
    model, _ = build_model(video(name), weights=False)
    assert budget(model)["trainable"] == trainable


def test_params_table_names_the_tasks():
    result = CliRunner().invoke(app, ["params", "--preset", "vlpet-small", "--task", "tvqa,how2qa"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "for tvqa, how2qa (512-d features)" in text and "403,200" in text
