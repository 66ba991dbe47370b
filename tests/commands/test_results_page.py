"""The results page of `vlpet eval --html`: a row per record worst first, thumbnails of the raw images, every field
escaped, and filters that work in a real browser (headless Chromium loads the page; the hash drives the filter)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from vlpet_cli.errors import VlpetError
from vlpet_cli.pages import ImageFinder, check_images_folder, write_page
from vlpet_cli.tasks import get_task
from vlpet_cli.toy.images import Scene, Shape, render_scene

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
EVIL = 'what is <script>window.hacked=1</script> "quoted" & \'single\'?'


def toy_images(folder: Path, n: int) -> list[str]:
    """n toy-world scenes saved as PNG files under folder/COCO/images/ (as the toy world lays them out)."""
    kinds = [("circle", "red"), ("square", "blue"), ("triangle", "green")]
    ids = []
    for i in range(n):
        kind, color = kinds[i % 3]
        img_id = f"COCO_val2014_{i:012d}"
        path = folder / "COCO" / "images" / f"{img_id}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        render_scene(Scene(img_id, "COCO", "white", (Shape(kind, color, "large", "center"),))).save(path)
        ids.append(img_id)
    return ids


def vqa_predictions(ids: list[str]) -> list[dict]:
    """Six VQA predictions: three right (score 100), one partly right (60) and two wrong (0)."""
    rows = [("red", ["red"] * 10), ("blue", ["blue"] * 10), ("green", ["green"] * 10), ("2", ["2"] * 2 + ["3"] * 8),
            ("yes", ["no"] * 10), ('"><img src=x onerror=alert(1)>', ["circle"] * 10)]
    return [{"question_id": i, "img_id": ids[i % len(ids)], "sent": EVIL if i == 5 else f"question number {i}?",
             "label": None, "answers": answers, "answer_type": "number" if i == 3 else "other", "prediction": pred}
            for i, (pred, answers) in enumerate(rows)]


class Rows(HTMLParser):
    """The page's record rows: (data-index, hidden) of every <tr class="row ...">, and whether any script element
    other than the page's own two exists."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int, bool]] = []
        self.scripts = 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "tr" and "row" in (a.get("class") or "").split():
            self.rows.append((int(a["data-index"]), "hidden" in a))
        if tag == "script":
            self.scripts += 1


def parse(html: str) -> Rows:
    parser = Rows()
    parser.feed(html)
    return parser


def shown(html: str) -> list[int]:
    return [i for i, hidden in parse(html).rows if not hidden]


@pytest.fixture
def page(tmp_path) -> tuple[Path, list[dict]]:
    ids = toy_images(tmp_path / "toy", 3)
    preds = vqa_predictions(ids)
    path = write_page(get_task("vqa"), "test", preds, tmp_path / "eval", metrics={"vqa": 60.0},
                      images=tmp_path / "toy")
    return path, preds


def test_page_has_a_row_per_record_worst_first_with_every_field_escaped(page):
    path, preds = page
    assert path.name == "vqa-test.html"
    html = path.read_text(encoding="ascii")
    parsed = parse(html)
    assert [i for i, _ in parsed.rows] == [4, 5, 3, 0, 1, 2]  # scores 0, 0, 60, 100, 100, 100
    assert parsed.scripts == 2  # the thumbnails' JSON and the filter: nothing injected by a field
    assert "<script>window.hacked" not in html and "&lt;script&gt;window.hacked=1&lt;/script&gt;" in html
    assert "&#34;quoted&#34; &amp; &#39;single&#39;" in html
    assert '"><img src=x' not in html
    thumbs = json.loads(re.search(r'<script id="thumbs" type="application/json">(.*?)</script>', html, re.S)[1])
    assert len(thumbs) == 3 and all(uri.startswith("data:image/jpeg;base64,") for uri in thumbs.values())
    assert html.count("data-thumb=") == 6  # each row shows its image; each image is stored once
    summary = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html.split('<div class="controls">')[0]))
    assert "60.00 VQA accuracy (vqa)" in summary and "6 records" in summary
    assert "3 correct" in summary and "3 wrong" in summary and "number 1 60.00 0" in summary
    assert "http://" not in html and "https://" not in html  # self-contained: nothing fetched


def dump_dom(path: Path, fragment: str = "") -> str:
    """The DOM after the page's script ran, as headless Chromium sees it."""
    out = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
                          f"file://{path}{fragment}"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


@pytest.mark.slow  # five browser starts: about 2 s each
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian's chromium package; .ci/run "
                                              "installs it): the page cannot be loaded in a real browser")
def test_filters_in_headless_chromium(page):
    path, preds = page
    scores = get_task("vqa").record_scores(preds)
    wrong = {i for i, s in enumerate(scores) if s < 100}
    everything = dump_dom(path)
    assert sorted(shown(everything)) == list(range(6))
    assert "6 of 6 shown" in everything and "window.hacked" not in everything.split("<body")[0]
    assert everything.count('src="data:image/jpeg;base64,') == 6  # the script filled in the thumbnails
    assert set(shown(dump_dom(path, "#wrong"))) == wrong == {3, 4, 5}
    assert set(shown(dump_dom(path, "#correct"))) == {0, 1, 2}
    searched = dump_dom(path, "#show=wrong&q=QUOTED")  # the search is case-insensitive, on the row's text
    assert shown(searched) == [5] and "1 of 6 shown" in searched
    assert shown(dump_dom(path, "#q=number%201")) == [1]


def test_image_finder_and_the_images_option(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("a/b/COCO_val2014_000000391895.jpg", "a/x.png", "a/b/x.png", "clip.mp4"):
        (tmp_path / name).write_bytes(b"")
    finder = ImageFinder(tmp_path)
    assert finder.find("a/b/x.png") == tmp_path / "a/b/x.png"  # the exact relative path first
    assert finder.find("x") == tmp_path / "a/b/x.png"  # else the stem, the first in sorted order
    assert finder.find("COCO_val2014_000000391895") == finder.find("391895") == \
        tmp_path / "a/b/COCO_val2014_000000391895.jpg"  # a COCO id names its file
    assert finder.find("missing") is None and ImageFinder(None).find("x") is None
    assert ImageFinder(tmp_path / "a").find("../clip.mp4") is None  # an id never reaches outside the folder
    with pytest.raises(VlpetError, match="--images .*not a folder"):
        check_images_folder(tmp_path / "clip.mp4")


def test_pages_without_images_and_for_videos_show_the_ids(tmp_path):
    task = get_task("tvqa")
    preds = [{"question_id": 1, "vid_name": "clip", "type": "friends", "answer": "a1", "sent": "[Q] who?",
              "prediction": "a1"},
             {"question_id": 2, "vid_name": "gone", "type": "friends", "answer": None, "sent": "[Q] what?",
              "prediction": "a0"}]
    (tmp_path / "clip.mp4").write_bytes(b"")
    html = write_page(task, "val", preds, tmp_path / "out", images=tmp_path).read_text()
    assert "clip (video)" in html and "gone (not found)" in html and "without references" in html
    assert [i for i, _ in parse(html).rows] == [0, 1]  # the unscored row last
    plain = write_page(task, "val", preds, tmp_path / "plain").read_text()
    assert 'data-thumb="' not in plain and ">clip</span>" in plain


def test_eval_predictions_html_writes_the_page_beside_the_file(tmp_path, monkeypatch, capsys):
    from tests.faults.faultkit import vlpet

    ids = toy_images(tmp_path / "toy", 2)
    ann = tmp_path / "testdev.json"
    ann.write_text(json.dumps([{"question_id": f"q{i}", "img_id": ids[i], "sent": f"what is {i}?",
                                "label": {"circle": 1.0}} for i in range(2)]))
    pred = tmp_path / "gqa-testdev.predictions.json"
    pred.write_text(json.dumps([{"questionId": "q0", "prediction": "circle"}, {"questionId": "q1",
                                                                             "prediction": "<b>x</b>"}]))
    code, out, err = vlpet(monkeypatch, capsys, "eval", "--task", "gqa", "--predictions", pred, "--annotations",
                           ann, "--html", "--images", tmp_path / "toy", "--json")
    assert code == 0, err
    assert json.loads(out)["acc"] == 50.0
    html = (tmp_path / "gqa-testdev.html").read_text()
    assert [i for i, _ in parse(html).rows] == [1, 0] and html.count("data-thumb=") == 2
    assert "&lt;b&gt;x&lt;/b&gt;" in html
    code, _, err = vlpet(monkeypatch, capsys, "eval", "--task", "gqa", "--predictions", pred, "--annotations", ann,
                         "--images", tmp_path / "toy")
    assert code == 2 and "--images" in err and "--html" in err


@pytest.mark.slow  # builds a (tiny, untrained) model and evaluates it
def test_eval_run_html_writes_the_page_beside_the_eval_files(tmp_path, monkeypatch, capsys):
    from tests.faults.faultkit import nlvr_root, no_model, one_line_error, untrained_run, vlpet

    root = nlvr_root(tmp_path / "data", test=3)
    raw = tmp_path / "raw"
    for i in range(3):
        for side, (kind, color) in enumerate([("circle", "red"), ("square", "blue")]):
            raw.mkdir(exist_ok=True)
            render_scene(Scene(f"test-{i}-img{side}", "nlvr", "cream",
                               (Shape(kind, color, "small", "left"),))).save(raw / f"test-{i}-img{side}.png")
    run = untrained_run(tmp_path / "run", root)
    with monkeypatch.context() as m:  # a wrong --images is refused before the model is built
        no_model(m)
        code, _, err = vlpet(m, capsys, "eval", run, "--html", "--images", tmp_path / "nowhere")
        one_line_error(code, err, "--images", "nowhere", "not a folder")
    code, out, err = vlpet(monkeypatch, capsys, "eval", run, "--html", "--images", raw)
    assert code == 0, err
    page = run / "eval" / "nlvr-test.html"
    assert f"results page: {page}" in out.replace("\n", "")
    html = page.read_text()
    predictions = json.loads((run / "eval" / "nlvr-test.predictions.json").read_text())
    record = json.loads((run / "eval" / "nlvr-test.json").read_text())
    assert sorted(i for i, _ in parse(html).rows) == [0, 1, 2] and len(predictions) == 3
    assert html.count("data-thumb=") == 6 and f'id="metric"><b>{record["metrics"]["acc"]:.2f}</b>' in html
