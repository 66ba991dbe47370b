"""Build and pretrain the shipped tiny backbones `tiny-bart`, `tiny-t5` and `tiny-bart-video` on the toy world's text.

Each gets a byte-level BPE tokenizer trained on the toy corpus (plus generated generic English), a tiny
encoder-decoder built from a config, and about 13 minutes of CPU pretraining: half denoising (BART: text
infilling, T5: span corruption), so that it knows the toy vocabulary and grammar, and half reading tasks (the toy
question templates answered from a written scene description), so that, frozen, it can already reason in language.
`tiny-bart-video` (family `bart-video`, used by `vlpet quickstart --video`) also reads the toy videos' text, and its
reading tasks add the video tasks: VALUE's encoder strings answered from a clip written out frame by frame, with the
letter of the right choice or a description of what happens.

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/pretrain_tiny_backbones.py [--steps 3000] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from vlpet_cli.toy import images as toy
from vlpet_cli.toy import videos as toy_video
from vlpet_cli.toy.images import toy_corpus

VOCAB_SIZE = 1000
MAX_LEN = 48
PROMPTS = {"vqa": "vqa: ", "gqa": "gpa: ", "nlvr": "nlvr: "}

# ---------------------------------------------------------------------------------------------- corpus

_SUBJECTS = [
    "the man",
    "a woman",
    "two dogs",
    "a small cat",
    "the children",
    "an old car",
    "my friend",
    "a young girl",
    "the teacher",
    "three birds",
    "a tall tree",
    "the red bus",
    "a group of people",
    "the kitchen",
    "a white horse",
    "the little boy",
    "a train",
    "some students",
    "the city",
    "a bird",
]
_VERBS = [
    "is sitting on",
    "is standing next to",
    "looks at",
    "is holding",
    "walks past",
    "is near",
    "is riding",
    "is parked in front of",
    "is playing with",
    "is eating",
    "is flying over",
    "is lying under",
    "is waiting for",
    "is painted like",
    "carries",
]
_OBJECTS = [
    "a wooden table",
    "the river",
    "a blue chair",
    "the green field",
    "a large building",
    "the road",
    "a plate of food",
    "the window",
    "a yellow umbrella",
    "the beach",
    "a tennis racket",
    "the sky",
    "a pizza",
    "the snow",
    "a computer",
    "the grass",
    "a black bag",
    "the wall",
    "a cup of coffee",
]
_TAILS = [
    "",
    " in the morning",
    " at night",
    " on a sunny day",
    " near the water",
    " in the park",
    " with a smile",
    " during the game",
    " in the rain",
    " inside the house",
]
_QUESTIONS = [
    "what is the man holding?",
    "how many people are there?",
    "is it raining?",
    "what color is the bus?",
    "where is the cat?",
    "is the door open?",
    "what sport is this?",
    "what is on the table?",
    "are there any birds?",
    "which side is the tree on?",
]


_WORDS = """people house water family school world country question number night point government company
system program student problem power money story month lot right study book eye job word business issue side
kind head service friend father mother hour game line end member law car city community name president team
minute idea kid body information back parent face others level office door health person art war history party
result change morning reason research girl guy moment air force education foot boy age policy music market
sense nation plan college interest death experience effect class control care field development role effort
rate heart drug show leader light voice wife police mind price report decision son view relationship town road
arm difference value building action model season society tax director position player record paper space
ground form event official matter center couple site project activity star table need court oil situation cost
industry figure street image phone data picture practice piece land product doctor wall patient worker news
test movie north love support technology step baby computer type attention film tree source organization hair
window evidence population truth song animal garden flower mountain ocean summer winter autumn spring bridge
apple orange banana bread cheese kitchen bottle glass chair sofa clock camera bicycle airplane boat elephant
giraffe zebra sheep cow horse skateboard surfboard kite frisbee umbrella suitcase laptop keyboard toilet sink
refrigerator oven sandwich broccoli carrot donut cake vase scissors teddy bear toothbrush hydrant bench
quickly slowly happily often never always sometimes together outside inside before after between during
beautiful ugly bright dark heavy light empty full clean dirty young old new wet dry hot cold soft hard
running jumping swimming cooking reading writing singing dancing driving flying sleeping talking laughing""".split()  # noqa: SIM905


def generic_english(rng: random.Random, n: int = 600) -> list[str]:
    """Simple generic English sentences and questions, so the tokenizer also covers everyday words."""
    lines = []
    for _ in range(n):
        if rng.random() < 0.35:
            words = rng.sample(_WORDS, rng.randint(4, 9))
            lines.append(" ".join(words).capitalize() + rng.choice([".", "", "?"]))
        elif rng.random() < 0.2:
            q = rng.choice(_QUESTIONS)
            lines.append(q[:1].upper() + q[1:])
        else:
            s = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}{rng.choice(_TAILS)}"
            lines.append(s[:1].upper() + s[1:] + rng.choice([".", "", "."]))
    return lines


def pretraining_texts(corpus: list[str]) -> list[str]:
    """Toy texts plus the same questions/statements behind their task prompts, as the tasks will feed them."""
    texts = list(corpus)
    for t in corpus:
        if t.endswith("?"):
            texts += [PROMPTS["vqa"] + t, PROMPTS["gqa"] + t]
        elif t.startswith(("The ", "Both ")):
            texts.append(PROMPTS["nlvr"] + t)
    texts.append("caption: ")
    return texts


# ------------------------------------------------------------------------------------------ reading tasks


def describe(scene) -> str:
    """A scene written out, e.g. 'a small red circle on the left and a large blue square in the middle, on a
    white background'."""
    shapes = " and ".join(f"a {s.size} {s.color} {s.kind} {toy._PLACE[s.pos]}" for s in scene.shapes)
    return f"{shapes}, on a {scene.background} background"


def reading_examples(rng: random.Random, n: int) -> list[tuple[str, str, str]]:
    """n (task text, scene description, answer) triples: the toy tasks answered from written descriptions of
    freshly drawn scenes (never the toy world's own), so that the frozen backbone, like a real pretrained
    language model, can already reason about what it is told."""
    out: list[tuple[str, str, str]] = []
    while len(out) < n:
        task = len(out) % 4
        scene = toy.random_scene(rng, "", "COCO")
        image = f"image: {describe(scene)}."
        if task == 0:
            question, answer, _, _ = rng.choice(sorted(toy._vqa_candidates(rng, scene).values()))
            out.append((PROMPTS["vqa"] + question, image, answer))
        elif task == 1:
            question, answer = rng.choice(sorted(toy._gqa_candidates(rng, scene).values()))
            out.append((PROMPTS["gqa"] + question, image, answer))
        elif task == 2:
            statement, truth = toy._statement(rng)
            want = rng.random() < 0.5
            pair = toy._pair_for(rng, [truth], (want,), tries=200)
            if pair is None:
                continue
            left, right = pair
            images = f"left image: {describe(left)}. right image: {describe(right)}."
            out.append((PROMPTS["nlvr"] + statement, images, "true" if want else "false"))
        else:
            out.append(("caption: ", image, rng.choice(toy.captions(rng, scene))))
    return out


def _subs(clip_subs: list[dict]) -> str:
    return " ".join(line["text"].strip() for line in clip_subs)


def video_source(task: str, subs: str, clip: toy_video.Clip, q: str = "", choices: list[str] | None = None) -> str:
    """A video task's encoder string as spec/pipeline.md §3.1 writes it (prompt after the text)."""
    if task in ("tvqa", "how2qa"):
        listed = " ".join(f"a{i}: {c.strip('. ')}." for i, c in enumerate(choices or []))
        return f"[Subs] {subs} [Q] {q} [TS] (0.00-{toy_video.DURATION_S:.2f}) [Choices] {listed} {task}: "
    if task == "tvc":
        return f"[Subs] {subs} [TS] ([0.0, {toy_video.DURATION_S}]) tvc: "
    return f"[Subs] {subs} yc2c: "


def video_texts(seed: int = toy.SEED, n_sources: int = 300) -> list[str]:
    """The toy video world's texts (subtitle lines, questions, choices, descriptions), the answer letters, and
    `n_sources` of its encoder strings as the video tasks feed them."""
    world = toy_video.make_video_world(seed)
    subs = {line["vid_name"]: _subs(line["sub"]) for lines in world.subtitles.values() for line in lines}
    clips = {c.vid_name: c for c in world.clips}
    sources = []
    for name, records in world.files.items():
        task = name.split("/")[0]
        for r in records:
            choices = [r[f"a{i}"] for i in range(5) if f"a{i}" in r]
            sources.append(video_source(task, subs[r["vid_name"]], clips[r["vid_name"]], r.get("q", ""), choices))
    sources = list(dict.fromkeys(sources))
    picked = random.Random(f"video-texts:{seed}").sample(sources, min(n_sources, len(sources)))
    return [f"a{i}" for i in range(5)] + toy_video.video_corpus(seed) + picked


def _where(cx: float, cy: float) -> str:
    """'top left' ... 'bottom right', 'middle' for the centre: a third of the frame each way."""
    third = toy_video.FRAME_SIZE / 3
    row = ("top", "middle", "bottom")[min(2, int(cy / third))]
    col = ("left", "middle", "right")[min(2, int(cx / third))]
    return "middle" if row == col == "middle" else " ".join(w for w in (row, col) if w != "middle")


def frame_account(clip: toy_video.Clip) -> str:
    """A clip written out frame by frame, one phrase per 1.5 s tick (as the frame features will come), e.g.
    'video: red square top left; red square top; red square top right; ...'."""
    frames = []
    for k in range(int(toy_video.DURATION_S / 1.5)):
        shapes = toy_video.frame_shapes(clip, 1.5 * k)
        frames.append(" and ".join(f"{color} {kind} {_where(cx, cy)}" for kind, color, cx, cy in shapes))
    return "video: " + "; ".join(frames) + "."


def video_reading_examples(rng: random.Random, n: int) -> list[tuple[str, str, str]]:
    """n (task text, clip account, answer) triples over freshly drawn clips (never the toy world's own), the
    account written frame by frame: the QA tasks with their choices in a random order, answered with the letter
    of the right choice, and the caption tasks answered with a description of what happens."""
    out: list[tuple[str, str, str]] = []
    tasks = ("tvqa", "how2qa", "tvc", "yc2c")
    while len(out) < n:
        task = tasks[len(out) % 4]
        source = {"tvqa": "tv", "how2qa": "how2", "tvc": "tv", "yc2c": "yc2"}[task]
        clip = toy_video._clip(rng, "", source, "train", "")
        subs = _subs(toy_video.subtitle_lines(rng, clip))
        account = frame_account(clip)
        if task in ("tvqa", "how2qa"):
            n_choices = 5 if task == "tvqa" else 4
            orders = {key: rng.sample(order, len(order)) for key, order in toy_video._orders(0).items()}
            q, choices, answer = rng.choice(toy_video.questions(clip, n_choices, orders))
            out.append((video_source(task, subs, clip, q, choices), account, f"a{answer}"))
        else:
            out.append((video_source(task, subs, clip), account, toy_video.descriptions(rng, clip, 1)[0]))
    return out


# ------------------------------------------------------------------------------------------- tokenizers


def tokenizer_lines(texts: list[str], generic: list[str], repeat: int = 30) -> list[str]:
    """Tokenizer training text: short texts (answers, true/false) are repeated so that each becomes one token
    when encoded on its own, as a target is."""
    short = [t for t in texts if len(t.split()) == 1]
    return texts + generic + short * repeat


def train_tokenizer(family: str, lines: list[str], vocab_size: int = VOCAB_SIZE):
    """A byte-level BPE tokenizer with the family's special tokens and post-processing, as a
    transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if family == "bart":
        specials = ["<s>", "<pad>", "</s>", "<unk>"]
    else:
        specials = ["<pad>", "</s>", "<unk>"]
    extra = ["<mask>"] if family == "bart" else [f"<extra_id_{k}>" for k in range(99, -1, -1)]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(extra),
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer=trainer)
    tok.add_special_tokens(extra)
    if family == "bart":
        bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>",
            pair="<s> $A </s> </s> $B </s>",
            special_tokens=[("<s>", bos), ("</s>", eos)],
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=tok,
            bos_token="<s>",
            eos_token="</s>",
            pad_token="<pad>",
            unk_token="<unk>",
            mask_token="<mask>",
            cls_token="<s>",
            sep_token="</s>",
            model_max_length=128,
        )
    eos = tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", eos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=extra,
        model_max_length=512,
    )


def check_tokenizer(path: Path, family: str, samples: list[str]) -> None:
    """Reload the saved tokenizer offline with AutoTokenizer and check ids and round trips."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    expected = (
        {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
        if family == "bart"
        else {"<pad>": 0, "</s>": 1, "<unk>": 2}
    )
    for t, i in expected.items():
        assert tok.convert_tokens_to_ids(t) == i, (family, t, tok.convert_tokens_to_ids(t))
    for word in ("true", "false", "yes", "no", "red", "circle"):
        assert len(tok.encode(word, add_special_tokens=False)) == 1, (family, word)
    for s in samples:
        ids = tok.encode(s)
        if family == "bart":
            assert ids[0] == 0 and ids[-1] == 2, ids
        else:
            assert ids[-1] == 1, ids
        assert tok.decode(ids, skip_special_tokens=True) == s, (s, tok.decode(ids, skip_special_tokens=True))
        assert tok.unk_token_id not in ids, s


# ---------------------------------------------------------------------------------------------- models


def build_model(family: str, tok):
    """A tiny BART or T5 encoder-decoder sized for the toy world, randomly initialised."""
    from transformers import BartConfig, BartForConditionalGeneration, T5Config, T5ForConditionalGeneration

    if family == "bart":
        config = BartConfig(
            vocab_size=len(tok),
            d_model=128,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=256,
            decoder_ffn_dim=256,
            max_position_embeddings=128,
            activation_function="gelu",
            dropout=0.1,
            attention_dropout=0.1,
            activation_dropout=0.1,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
            decoder_start_token_id=2,
            forced_bos_token_id=None,
            forced_eos_token_id=None,
            tie_word_embeddings=True,
            scale_embedding=False,
        )
        return BartForConditionalGeneration(config)
    config = T5Config(
        vocab_size=len(tok),
        d_model=128,
        d_kv=32,
        num_heads=4,
        d_ff=256,
        num_layers=2,
        num_decoder_layers=2,
        feed_forward_proj="relu",
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        tie_word_embeddings=True,
    )
    return T5ForConditionalGeneration(config)


# ------------------------------------------------------------------------------------------- objectives


def _spans(rng: random.Random, n: int, density: float, mean_len: float) -> list[tuple[int, int]]:
    """Non-overlapping (start, length) noise spans covering about `density` of `n` tokens."""
    budget = max(1, round(n * density))
    spans: list[tuple[int, int]] = []
    covered = [False] * n
    tries = 0
    while budget > 0 and tries < 50:
        tries += 1
        length = min(budget, max(1, round(rng.expovariate(1 / mean_len))))
        start = rng.randrange(0, max(1, n - length + 1))
        if any(covered[max(0, start - 1) : start + length + 1]):
            continue
        for i in range(start, start + length):
            covered[i] = True
        spans.append((start, length))
        budget -= length
    return sorted(spans)


def bart_example(rng: random.Random, ids: list[int], mask_id: int) -> tuple[list[int], list[int]]:
    """Text infilling: ~30% of the tokens, in spans, each span replaced by one <mask>; target the original."""
    body = ids[1:-1]
    out, pos = [], 0
    for start, length in _spans(rng, len(body), 0.3, 3.0):
        out += body[pos:start] + [mask_id]
        pos = start + length
    out += body[pos:]
    return [ids[0]] + out + [ids[-1]], ids


def t5_example(rng: random.Random, ids: list[int], sentinel0: int) -> tuple[list[int], list[int]]:
    """Span corruption: ~15% of tokens in spans become <extra_id_k> in the input; the target lists them."""
    body = ids[:-1]
    src, tgt, pos = [], [], 0
    spans = _spans(rng, len(body), 0.15, 3.0)
    for k, (start, length) in enumerate(spans):
        sentinel = sentinel0 - k  # <extra_id_k> ids run downwards, as in T5
        src += body[pos:start] + [sentinel]
        tgt += [sentinel] + body[start : start + length]
        pos = start + length
    src += body[pos:] + [ids[-1]]
    tgt += [sentinel0 - len(spans), ids[-1]]
    return src, tgt


def collate(pairs: list[tuple[list[int], list[int]]], pad_id: int):
    """Pad inputs with the pad id and labels with -100."""
    import torch

    n_src = max(len(s) for s, _ in pairs)
    n_tgt = max(len(t) for _, t in pairs)
    input_ids = torch.full((len(pairs), n_src), pad_id, dtype=torch.long)
    labels = torch.full((len(pairs), n_tgt), -100, dtype=torch.long)
    for i, (s, t) in enumerate(pairs):
        input_ids[i, : len(s)] = torch.tensor(s)
        labels[i, : len(t)] = torch.tensor(t)
    return {"input_ids": input_ids, "attention_mask": (input_ids != pad_id).long(), "labels": labels}


def pretrain(
    family: str,
    model,
    tok,
    texts: list[str],
    reading: list[tuple[str, str, str]],
    steps: int,
    seed: int,
    batch_size: int = 64,
    lr: float = 2e-3,
    reading_share: float = 0.5,
    log_every: int = 100,
) -> dict:
    """Denoising mixed with reading tasks (a `reading_share` of each batch), AdamW, linear warm-up and cosine
    decay; returns the loss record. A reading example's description follows the task text's end token, where
    the visual tokens will be."""
    import torch

    torch.manual_seed(seed)
    rng = random.Random(seed)
    encoded = [tok.encode(t, truncation=True, max_length=MAX_LEN) for t in texts]
    read = [(tok.encode(text) + tok.encode(scene, add_special_tokens=False), tok.encode(answer))
            for text, scene, answer in reading]
    if family == "bart":
        denoise = lambda ids: bart_example(rng, ids, tok.mask_token_id)
    else:
        s0 = tok.convert_tokens_to_ids("<extra_id_0>")
        denoise = lambda ids: t5_example(rng, ids, s0)
    make = lambda: rng.choice(read) if rng.random() < reading_share else denoise(rng.choice(encoded))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))) + 0.05)
    )
    model.train()
    losses, start = [], time.perf_counter()
    for step in range(steps):
        batch = collate([make() for _ in range(batch_size)], tok.pad_token_id)
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if (step + 1) % log_every == 0 or step == 0:
            recent = losses[-log_every:]
            print(
                f"[{family}] step {step + 1}/{steps} loss {sum(recent) / len(recent):.4f} "
                f"({time.perf_counter() - start:.0f}s)",
                flush=True,
            )
    model.eval()
    window = max(1, min(50, steps // 10))
    return {
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "seconds": round(time.perf_counter() - start, 1),
        "loss_first": round(sum(losses[:window]) / window, 4),
        "loss_last": round(sum(losses[-window:]) / window, 4),
        "loss_window": window,
    }


def sample_fill(family: str, model, tok, text: str) -> str:
    """Greedy reconstruction of one corrupted toy sentence, for a human-readable check in the log."""
    import torch

    ids = tok.encode(text)
    rng = random.Random(0)
    src = (
        bart_example(rng, ids, tok.mask_token_id)[0]
        if family == "bart"
        else t5_example(rng, ids, tok.convert_tokens_to_ids("<extra_id_0>"))[0]
    )
    with torch.no_grad():
        out = model.generate(torch.tensor([src]), max_new_tokens=30, num_beams=1, do_sample=False)
    return f"{tok.decode(src)!r} -> {tok.decode(out[0], skip_special_tokens=family == 'bart')!r}"


# ------------------------------------------------------------------------------------------------ main


def dir_size(path: Path) -> int:
    """Total bytes of the files under `path`."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> None:
    """Train tokenizers, build, pretrain and save tiny-bart and tiny-t5."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out-dir", type=Path, default=REPO / "vlpet_cli" / "assets" / "backbones")
    ap.add_argument("--steps", type=int, default=3000, help="optimisation steps per backbone")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reading", type=int, default=20000, help="reading-task examples (drawn once)")
    ap.add_argument("--video-reading", type=int, default=8000, help="video reading-task examples (drawn once)")
    ap.add_argument("--families", default="bart,t5,bart-video", help="comma-separated: bart, t5, bart-video")
    ap.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads (0: torch's default; 1 on a busy machine)"
    )
    args = ap.parse_args(argv)

    import torch
    import transformers

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    corpus = toy_corpus()
    generic = generic_english(random.Random(args.seed))
    image_texts = pretraining_texts(corpus)
    image_reading = reading_examples(random.Random(f"reading:{args.seed}"), args.reading)
    print(f"toy corpus: {len(corpus)} texts; pretraining lines: {len(image_texts)}; generic lines: {len(generic)}")
    for name in args.families.split(","):
        family, video = name.removesuffix("-video"), name.endswith("-video")
        texts = image_texts + video_texts() if video else image_texts
        reading = image_reading
        if video:
            reading = reading + video_reading_examples(random.Random(f"video-reading:{args.seed}"), args.video_reading)
        out = args.out_dir / f"tiny-{name}"
        random.seed(args.seed)
        torch.manual_seed(args.seed)
        tok = train_tokenizer(family, tokenizer_lines(texts, generic))
        model = build_model(family, tok)
        n_params = sum(p.numel() for p in model.parameters())
        print(f"[{family}] vocab {len(tok)}, {n_params:,} parameters")
        record = pretrain(family, model, tok, texts, reading, args.steps, args.seed)
        for text in corpus[:: max(1, len(corpus) // 3)][:3]:
            print(f"[{family}] {sample_fill(family, model, tok, text)}")
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out)
        tok.save_pretrained(out)
        for f in out.iterdir():
            f.chmod(0o644)
        record.update(
            family=name,
            objective=("text infilling (30%, mean span 3)" if family == "bart"
                       else "span corruption (15%, mean span 3)") + " mixed half and half with reading tasks",
            reading_examples=len(reading),
            corpus_size=len(texts),
            toy_texts=len(corpus),
            tokenizer_extra_lines=len(generic),
            vocab_size=len(tok),
            parameters=n_params,
            seed=args.seed,
            threads=torch.get_num_threads(),
            torch=torch.__version__,
            transformers=transformers.__version__,
        )
        (out / "pretraining.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        check_tokenizer(out, family, corpus[:200])
        print(f"[{family}] saved {out} ({dir_size(out) / 1e6:.2f} MB): {json.dumps(record)}")


if __name__ == "__main__":
    main()
