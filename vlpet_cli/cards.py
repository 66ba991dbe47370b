"""Model cards: the `README.md` beside every adapter, bundle, folded model and PEFT export.

A card is Markdown with YAML front matter in the Hugging Face Hub's format (written with huggingface_hub's
`ModelCardData`): `library_name: vlpet`, `base_model`, `tags` (vision-language, the method, the preset, the kind),
`datasets` (the tasks), `metrics` and, once the directory has been evaluated, a `model-index` holding the scores.
Its body says what the directory holds, its trainable parameters, the settings it was trained with, the evaluation
table, how to load it and the paper's citation. The card is rendered only from what it is given: `artifacts` reads
a directory's own files into `CardFacts`; this module knows nothing of the formats.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeGuard

import yaml

from vlpet_cli.atomic import write_text
from vlpet_cli.backbones import ALIASES, BUILTIN

CARD = "README.md"
LIBRARY = "vlpet"
PAPER = "https://arxiv.org/abs/2308.09804"
CITATION = """@inproceedings{hu2023vlpet,
  title     = {{VL-PET}: Vision-and-Language Parameter-Efficient Tuning via Granularity Control},
  author    = {Hu, Zi-Yuan and Li, Yanyang and Lyu, Michael R. and Wang, Liwei},
  booktitle = {Proceedings of the IEEE/CVF International Conference on Computer Vision (ICCV)},
  year      = {2023}
}"""

KINDS = {
    "adapter": "a vlpet adapter: only the trained tensors (`adapter.safetensors`) and the preset and backbone "
               "identity (`vlpet_config.json`); it loads onto its base model",
    "bundle": "a vlpet bundle: the base model with the foldable modules folded in (`backbone/`), the modules that "
              "cannot be folded as an adapter beside it, and the visual projector",
    "folded": "a folded model: a plain Hugging Face model directory whose weights hold the trained modules, plus "
              "the visual projector (`projector.safetensors`)",
    "peft": "a PEFT adapter (`adapter_config.json`, `adapter_model.safetensors`) exported from a vlpet adapter, with "
            "the visual projector beside it (`projector.safetensors`)",
}


@dataclass
class CardFacts:
    """Everything a card says, read from the directory it describes (see artifacts.card_facts)."""

    kind: str  # adapter | bundle | folded | peft
    name: str  # the model's name: the run's name for a run's adapter, else the directory's name
    preset: dict  # the resolved preset the model was trained with (as stored)
    base_model: str  # the backbone it was trained from, as the preset names it
    model_type: str | None = None  # the backbone's model_type (bart, t5, ...)
    parameters: dict | None = None  # {"trainable", "total", "percent"} of the model as trained
    evaluations: list[dict] = field(default_factory=list)  # eval/<task>-<split>.json records
    scores_of: str | None = None  # whose scores they are when not this directory's own (a PEFT export's source)
    notes: list[str] = field(default_factory=list)  # where it came from: merge, fold, import, best epoch, ...
    peft_base: str | None = None  # a PEFT export: the base model directory it applies to


# ---- facts from files ---------------------------------------------------------------------------------------
def read_evaluations(*eval_dirs: Path | None, newer_than: float = 0.0) -> list[dict]:
    """The `<task>-<split>.json` records of `vlpet eval` in these folders, written after `newer_than` (a
    timestamp: older records scored other weights, e.g. before a resumed run wrote a new adapter); a later folder's
    record of a task and split replaces an earlier one. Unreadable or foreign files are skipped: a card never
    fails on them."""
    found: dict[tuple[str, str], dict] = {}
    for folder in eval_dirs:
        if folder is None or not Path(folder).is_dir():
            continue
        for path in sorted(Path(folder).glob("*-*.json")):
            if path.name.count(".") != 1 or path.stat().st_mtime < newer_than:  # not <task>-<split>.json, or stale
                continue
            try:
                record = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if (isinstance(record, dict) and isinstance(record.get("task"), str)
                    and isinstance(record.get("split"), str) and isinstance(record.get("metrics"), dict)):
                found[(record["task"], record["split"])] = record
    from vlpet_cli.tasks import TASKS

    order = list(TASKS)
    return [found[key] for key in sorted(found, key=lambda k: (order.index(k[0]) if k[0] in order else len(order),
                                                                *k))]


def hub_id(backbone: str) -> str:
    """The Hub id of a built-in backbone name (bart-base -> facebook/bart-base); anything else as given."""
    key = ALIASES.get(backbone, backbone)
    return BUILTIN[key]["hub_id"] if key in BUILTIN else backbone


def slug(text: str) -> str:
    """A tag: 'Compacter + Glarge + LW' -> 'compacter-glarge-lw'."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _number(value: Any) -> TypeGuard[float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def whole_split(record: dict) -> bool:
    """Whether an eval record scored its whole split (no --limit cut it short) of a task the model was trained on."""
    limit, n = record.get("limit"), record.get("n")
    cut = _number(limit) and not (_number(n) and n < limit)
    return not cut and record.get("trained") is not False


def _task_info(task: str) -> tuple[str | None, str, str]:
    """(primary metric, its name for people, the Hub task type) of a task; unknown tasks get generic words."""
    from vlpet_cli.tasks import TASKS

    cls = TASKS.get(task)
    if cls is None:
        return None, "score", "image-text-to-text"
    return cls.primary_metric, cls.label, cls.hub_task


def _flat(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if _number(v)}


# ---- rendering ----------------------------------------------------------------------------------------------
def front_matter(facts: CardFacts) -> str:
    """The YAML metadata block (without the --- fences), as huggingface_hub writes it."""
    from huggingface_hub import EvalResult, ModelCardData

    tasks = [t for t in (facts.preset.get("data") or {}).get("tasks") or [] if isinstance(t, str)]
    method = facts.preset.get("method") or facts.preset.get("name") or "vlpet"
    tags = [LIBRARY, "vision-language", "parameter-efficient-fine-tuning", slug(method),
            slug(str(facts.preset.get("name") or method)), facts.kind, *filter(None, [facts.model_type])]
    if (facts.preset.get("data") or {}).get("data_root") == "toy":
        tags.append("toy-world")
    results = []
    for record in facts.evaluations:
        if not whole_split(record):  # a --limit subset or an untrained task is in the table, not in the index
            continue
        primary, label, kind = _task_info(record["task"])
        for metric, value in _flat(record["metrics"]).items():
            results.append(EvalResult(task_type=kind, task_name=record["task"], dataset_type=record["task"],
                                      dataset_name=record["task"], dataset_split=record["split"],
                                      metric_type=metric, metric_value=round(value, 4),
                                      metric_name=label if metric == primary else metric))
    metrics = list(dict.fromkeys(r.metric_type for r in results))
    data = ModelCardData(library_name=LIBRARY, base_model=hub_id(facts.base_model),
                         tags=list(dict.fromkeys(tags)), datasets=tasks or None, metrics=metrics or None,
                         model_name=facts.name if results else None, eval_results=results or None)
    return data.to_yaml()


def _settings(preset: dict) -> str:
    """The effective training settings: the PET modules that are on, the model's visual input, train.*."""
    pet = {k: v for k, v in (preset.get("pet") or {}).items() if v not in (None, False)}
    train = dict(preset.get("train") or {})
    tasks = (preset.get("data") or {}).get("tasks") or []
    if isinstance(train.get("task_ratios"), dict):
        train["task_ratios"] = {t: r for t, r in train["task_ratios"].items() if t in tasks}
    shown = {"pet": pet, "model": preset.get("model") or {}, "train": train}
    return yaml.safe_dump(shown, sort_keys=False, default_flow_style=None, width=110).rstrip()


def _evaluation_table(facts: CardFacts) -> list[str]:
    if not facts.evaluations:
        where = "the source adapter" if facts.kind == "peft" else f"`vlpet eval ./{facts.name}`"
        return ["Not evaluated yet." + ("" if facts.kind == "peft" else
                                        f" Score it with {where}; the card then shows the scores.")]
    lines = []
    if facts.scores_of:
        lines += [f"Scores of {facts.scores_of}.", ""]
    lines += ["| task | split | n | score | all metrics |", "|---|---|---:|---:|---|"]
    left_out = False
    for record in facts.evaluations:
        primary, label, _ = _task_info(record["task"])
        flat = _flat(record["metrics"])
        score = f"{flat[primary]:.2f} ({label})" if primary in flat else "—"
        mark = ""
        if record.get("trained") is False:
            mark = " (not trained on this task)"
        elif not whole_split(record):
            mark = f" (first {record['limit']} records only)"
        left_out = left_out or bool(mark)
        shown = ", ".join(f"{k} {v:.2f}" for k, v in flat.items())
        lines.append(f"| {record['task']} | {record['split']}{mark} | {record.get('n', '—')} | {score} | {shown} |")
    if left_out:
        lines += ["", "Rows marked as a subset or an untrained task are left out of the metadata's `model-index`."]
    return lines


def _predict_example(where: str, task: str) -> str:
    from vlpet_cli.tasks import TASKS

    cls = TASKS.get(task)
    if cls is None:
        return f"vlpet predict {where} --task {task} --inputs inputs.jsonl"
    takes = cls.inputs
    given = ["--video clip.mp4"] if takes.video else [f"-i {name}.jpg" for name in
                                                      (["photo"] if takes.images == 1 else ["left", "right"])]
    if takes.text:
        given.append(f'--{takes.text} "..."')
    given += ["--choices ..."] * takes.choices
    return f"vlpet predict {where} --task {task} {' '.join(given)}"


def _usage(facts: CardFacts) -> list[str]:
    where = f"./{facts.name}"
    tasks = (facts.preset.get("data") or {}).get("tasks") or []
    if facts.kind == "peft":
        base = facts.peft_base or f"{facts.base_model} (vocabulary resized as `vlpet` builds it)"
        return ["Load it with `peft` (the visual projector is not part of a PEFT adapter: `projector.safetensors` "
                "and `projector.json` beside it hold it):", "", "```python",
                "from peft import PeftModel", "from transformers import AutoModelForSeq2SeqLM", "",
                f'base = AutoModelForSeq2SeqLM.from_pretrained("{base}")',
                f'model = PeftModel.from_pretrained(base, "{where}")', "```", "",
                "`vlpet eval` and `vlpet predict` take the vlpet adapter it was exported from."]
    lines = ["```bash", f"vlpet eval {where}" + (f" --task {','.join(tasks)}" if tasks else "")
             + "   # add --data-root DIR where the data has moved"]
    lines += [_predict_example(where, t) for t in tasks[:1]]
    lines += ["```"]
    if facts.kind == "adapter":
        lines += ["", f"`--backbone DIR` points `vlpet eval`/`predict` at the base model ({facts.base_model}) where "
                      f"it lives elsewhere."]
    return lines


def render(facts: CardFacts) -> str:
    """The whole card: front matter, then the body."""
    preset = facts.preset
    method = preset.get("method") or preset.get("name") or "vlpet"
    tasks = [t for t in (preset.get("data") or {}).get("tasks") or [] if isinstance(t, str)]
    root = (preset.get("data") or {}).get("data_root")
    p = facts.parameters or {}
    lines = ["---", front_matter(facts).rstrip(), "---", "", f"# {facts.name}", "",
             f"{method} on {hub_id(facts.base_model)}, trained with vlpet for "
             f"{', '.join(tasks) or 'no task'}. This directory is {KINDS.get(facts.kind, facts.kind)}.", "",
             "| | |", "|---|---|", f"| method | {method} |", f"| preset | `{preset.get('name')}`: "
             f"{preset.get('description', '')} |", f"| base model | `{facts.base_model}` |"]
    if _number(p.get("trainable")) and _number(p.get("total")) and _number(p.get("percent")):
        lines.append(f"| trainable parameters | {p['trainable']:,} of {p['total']:,} ({p['percent']:.2f} %) |")
    lines.append(f"| tasks | {', '.join(tasks) or '—'} |")
    if root:
        lines.append(f"| data | {'the built-in toy world' if root == 'toy' else f'`{root}`'} |")
    for note in facts.notes:
        label, _, text = note.partition(":")
        lines.append(f"| {label} | {text.strip().replace('|', '/')} |")
    lines += ["", "## Training", "", "The effective settings it was trained with, from its resolved preset:", "",
              "```yaml", _settings(preset), "```", "", "## Evaluation", "", *_evaluation_table(facts), "",
              "## Use", "", *_usage(facts), "", "## Citation", "",
              f"The method is VL-PET ([paper]({PAPER})); if you use this model, please cite:", "", "```bibtex",
              CITATION, "```", ""]
    return "\n".join(lines)


def write_card(directory: Path, facts: CardFacts) -> Path:
    """Write `<directory>/README.md` atomically; returns its path."""
    path = Path(directory) / CARD
    write_text(path, render(facts))
    return path


def read_front_matter(path: Path) -> dict:
    """The YAML metadata of a card (for tests and tools); {} when there is none."""
    text = Path(path).read_text(encoding="utf-8")
    if not text.startswith("---\n"):
        return {}
    end = text.find("\n---", 4)
    data = yaml.safe_load(text[4:end]) if end > 0 else None
    return data if isinstance(data, dict) else {}
