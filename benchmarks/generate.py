"""Generation: vlpet's evaluation path against bare `generate` on the same encoder outputs.

A bart-base-size VL-PET-large model (random weights; benchmarks/synthetic.py) on a synthetic data root in the
real formats. `vlpet-*` times `inference.predict` over the test split (feature reads from packed HDF5,
tokenisation, collation, the encoder, `generate` with the task's settings, decoding the
text); `bare-*` collates the same batches beforehand and times only the model: the encoder
(`VLModel.encode`, which vlpet's path must run too) and `backbone.generate(encoder_outputs=...)` on its outputs
with the same GenerationConfig. The ratio is the eval path's cost over the model's.
  gen_ratio_coco  COCO captioning, 5 beams, max length 20 (BART: no-repeat 3-grams)   target <= 1.05
  gen_ratio_vqa   VQA, greedy, max length 20                                          target <= 1.05
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
import synthetic  # noqa: E402

CONFIGS = ("vlpet-coco", "bare-coco", "vlpet-vqa", "bare-vqa")


def measure(name: str, work: Path, records: int, batch_size: int) -> dict:
    """Seconds to predict `records` test records of one task, through vlpet or bare generate."""
    import torch

    from vlpet_cli.data.loading import load_task_data
    from vlpet_cli.data.multitask import eval_batches, eval_order
    from vlpet_cli.inference import decoding_settings, predict
    from vlpet_cli.tasks import task_class
    from vlpet_cli.train import resolve_train_preset
    from vlpet_cli.vl.model import build_model

    kind, task = name.split("-")
    preset = resolve_train_preset("vlpet-large", [task], str(work / "root"), str(work / "backbone"),
                                  [f"eval.limit={records}"])
    torch.manual_seed(0)
    model, tok = build_model(preset, weights=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    ds = load_task_data(preset, work / "root", tok, splits=("test",)).val[task]
    if kind == "vlpet":
        with torch.no_grad():  # the same one-off warm-up as the bare side
            first = next(eval_batches(ds, batch_size, order=eval_order(ds)))
            model.encode({k: v.to(device) if hasattr(v, "to") else v for k, v in first.items()})
        sync()
        start = time.perf_counter()
        preds = predict(model, tok, ds, preset, batch_size)
        sync()
        seconds = time.perf_counter() - start
        n = len(preds)
    else:
        from transformers import GenerationConfig

        assert not hasattr(task_class(task).decoding, "choices")
        config = GenerationConfig(decoder_start_token_id=model.config.decoder_start_token_id,
                                  **decoding_settings(model, tok, preset, task))
        with torch.no_grad():
            batches = [{k: v.to(device) if hasattr(v, "to") else v for k, v in b.items()}
                       for b in eval_batches(ds, batch_size, order=eval_order(ds))]
            model.encode(batches[0])  # the first forward of a process pays one-off set-up; vlpet's does too
            sync()
            start = time.perf_counter()
            for batch in batches:
                enc, mask = model.encode(batch)
                model.backbone.generate(encoder_outputs=enc, attention_mask=mask, generation_config=config)
            sync()
            seconds = time.perf_counter() - start
        n = len(ds)
    return {"seconds": seconds, "samples_per_s": n / seconds, "records": n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--records", type=int, default=32, help="test records per task")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "vlpet-bench-generate")
    parser.add_argument("--one", choices=CONFIGS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.work, args.records, args.batch_size)))
        return
    synthetic.make_root(args.work / "root", 2 * args.records, 200, n_val=args.records)
    synthetic.make_backbone(args.work / "backbone")
    flags = ["--work", str(args.work), "--records", str(args.records), "--batch-size", str(args.batch_size)]
    results = harness.alternate(list(CONFIGS), args.rounds, lambda n: harness.run_one(__file__, n, flags),
                                log=harness.log_stderr)
    ratios = {f"gen_ratio_{t}": harness.ratio(results, f"vlpet-{t}", f"bare-{t}", "seconds") for t in ("coco", "vqa")}
    absolute = {n: {"samples_per_s": round(harness.median_of(results, n, "samples_per_s"), 3)} for n in CONFIGS}
    harness.print_summary(harness.summary(
        "generate", ratios, {"gen_ratio_coco": ("<=", 1.05), "gen_ratio_vqa": ("<=", 1.05)},
        {"records": args.records, "batch_size": args.batch_size, "rounds": args.rounds, "absolute": absolute}))


if __name__ == "__main__":
    main()
