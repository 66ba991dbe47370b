"""Validated configuration: a preset is a tree of pydantic models with unknown keys forbidden.

The `pet` subtree is the PET methods' own (`pet/specs.py`, one spec per method beside the methods); the rest is
here.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from vlpet_cli.pet.specs import PetConfig, Strict


class ModelConfig(Strict):
    backbone: str = "bart-base"
    feat_dim: int = Field(2048, gt=0, description="visual feature size (CLIP RN101 grid: 2048)")
    n_boxes: int = Field(36, gt=0, description="visual tokens per image after adaptive max pooling")
    dropout: float | None = Field(
        0.1, ge=0.0, lt=1.0, description="every dropout rate of the backbone config (dropout, attention_dropout, "
                                         "activation_dropout; T5: dropout_rate), as the reference's --dropout; "
                                         "null keeps the checkpoint's own")


# Per-task settings (data.tasks, train.task_ratios, eval.generation) default to the tasks' own: a task's batch ratio,
# decoding and the default task list are declared once, by the task (vlpet_cli/tasks/), and read from the task table
# where they are used; a preset names only what it changes.
class VideoData(Strict):
    """Video-text tasks (TVQA, How2QA, TVC, YC2C): text length, subtitle truncation, frames (spec §2.3, §3.1, §8)."""

    max_length: int = Field(600, gt=0, description="encoder text tokens, special tokens included")
    truncate: Literal["tail", "subtitles"] = Field(
        "tail", description="tail: cut the end of the text, question and prompt included (reference); "
                            "subtitles: shorten the subtitles so question, choices and prompt survive (fix)")
    frames: int = Field(64, gt=0, description="visual tokens per video: zero-pad or adaptive max-pool over time")
    mask_padding: bool = Field(False, description="mask zero-padded frames (fix; reference: padded frames attended)")
    dedup_test: bool = Field(False, description="TVQA test: drop questions repeated across test_public and "
                                                "test_release (fix; reference: loads both)")
    feature_name: str = Field("clip-vit", description="video/vis_features/<source>/<feature_name>/ folder")


class DataConfig(Strict):
    data_root: str | None = None
    tasks: list[str] | None = Field(None, description="the run's tasks; None: the task table's default tasks "
                                                       "(the image tasks), set when the preset is resolved")
    use_prompts: bool = True
    prompts: dict[str, str] | None = Field(None, description="per-task prompt overrides")
    feature_name: str = "data_clip_RN101_att"
    task_files: dict[str, str] = Field(default_factory=dict, description="the task files of the run's own tasks "
                                       "(name -> file); the run keeps a copy of each in tasks/<name>.yaml")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes (0: load in the training process)")
    limit: int | None = Field(None, gt=0, description="use at most this many records per task and split")
    video: VideoData = VideoData()


# The experiment trackers Accelerate offers (accelerate.utils.LoggerType, less "all"); vlpet_cli/trackers.py uses them.
Tracker = Literal["tensorboard", "mlflow", "wandb", "aim", "comet_ml", "clearml", "dvclive", "swanlab", "trackio"]


class TrainConfig(Strict):
    lr: float = 1e-3
    epochs: int = Field(20, gt=0)
    batch_size: int = Field(500, gt=0, description="the batch of a task with ratio 1; each task's is this x its ratio")
    task_ratios: dict[str, float] = Field(default_factory=dict, description="batch-size ratio per task; a task not "
                                                                            "named uses its own (the reference's)")
    warmup_ratio: float = Field(0.1, ge=0, description="linear warm-up over this fraction of the updates")
    clip_grad_norm: float = Field(5.0, description="clip the total gradient norm to this; 0 or negative: no clipping "
                                                   "(the reference's rule)")
    grad_accum: int = Field(1, gt=0)
    optimizer: Literal["reference", "torch"] = Field(
        "reference", description="reference: transformers 4.2.1's AdamW, the reference's (eps added to the "
                                 "un-bias-corrected sqrt(v), decay after the update); torch: torch.optim.AdamW "
                                 "(fused on CUDA)")
    weight_decay: float = 0.01
    decay_rule: Literal["reference", "corrected"] = Field(
        "reference", description="reference: no decay for tensors whose reference name contains 'bias' or "
                                 "'LayerNorm.weight' (LayerNorm weights, gate vectors and Compacter's PHM biases "
                                 "decay); corrected: no decay for every bias, LayerNorm, gate vector and IA3 vector")
    adam_eps: float = 1e-6
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="fp32; bf16: bfloat16 autocast; fp16: float16 autocast with loss scaling (Accelerate's "
                            "gradient scaler), on a CUDA GPU and BART-family backbones only (T5 overflows in fp16)")
    seed: int = 42
    data_seed: int = Field(0, description="data order seed (reference: 0, independent of seed)")
    checkpoint_every: int = Field(0, ge=0, description="steps between checkpoints (0: epoch ends only)")
    keep_checkpoints: int = Field(2, gt=0)
    max_steps: int | None = Field(None, gt=0, description="stop after this many optimiser steps")
    gradient_checkpointing: bool = Field(False, description="recompute backbone activations in backward "
                                                            "(less memory, same results)")
    threads: int | None = Field(None, gt=0, description="CPU threads per process (None: chosen from the CPUs this "
                                                        "process may use and the model's size; VLPET_THREADS too)")
    report_to: list[Tracker] = Field(
        default_factory=list, description="experiment trackers logging into the run's logs/ folder: tensorboard, "
                                          "mlflow (a file store in logs/mlflow unless MLFLOW_TRACKING_URI is set), "
                                          "wandb (WANDB_MODE=offline: files in logs/wandb), or any other tracker "
                                          "Accelerate offers that is installed")


class GenerationSpec(Strict):
    """How a task's answers are generated; a setting left None is the task's own (its declared decoding)."""

    num_beams: int | None = Field(None, gt=0, description="None: the task's own")
    max_length: int | None = Field(None, gt=0, description="None: the task's own")
    no_repeat_ngram_size: int | None = Field(None, ge=0, description="None: BART 3 (its config's default), T5 0")


class EvalConfig(Strict):
    every: int = Field(1, ge=0, description="validate every N epochs (0: never)")
    batch_size: int = Field(64, gt=0)
    limit: int | None = Field(None, gt=0, description="validate on at most this many records per task")
    best_metric: str = Field("avg", description="'avg' of the primary metrics, or TASK.METRIC e.g. coco.cider")
    vqa_variant: Literal["reference", "official"] = "reference"
    caption_references: Literal["row", "clip"] = Field(
        "row", description="TVC/YC2C validation: one reference per row (reference) or every description of the "
                           "clip (VALUE's scoring)")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="generation and scoring (vlpet eval, validation) under bf16 or fp16 autocast; fp16 on a "
                            "CUDA GPU and BART-family backbones only")
    generation: dict[str, GenerationSpec] = Field(
        default_factory=dict, description="decoding per task; a task or setting not given decodes as the task "
                                          "declares (e.g. COCO 5 beams, VQA greedy)")


class Preset(Strict):
    name: str
    method: str
    description: str
    families: list[Literal["bart", "t5"]] = ["bart", "t5"]
    model: ModelConfig = ModelConfig()
    pet: PetConfig = PetConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    t5: dict | None = Field(None, description="overrides applied when the backbone is a T5")
    video: dict | None = Field(None, description="overrides applied when the tasks are video tasks")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not v or "/" in v:
            raise ValueError("preset name must be a non-empty word")
        return v
