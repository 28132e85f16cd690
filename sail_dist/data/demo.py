"""The embedded demo dataset: generated on first use with Pillow, learnable by the tiny model on a CPU.

`ensure_demo(dir)` writes (deterministically, in a few seconds):
  dir/train.jsonl, dir/eval.jsonl   InternVL-style records ("conversations", "image"/"images", plus a
                                    "task" key) with short answers that can be checked exactly
  dir/images/*.png                  small pictures: one coloured shape, a few circles to count, a rendered
                                    word or number, two pictures to compare, a wide picture with two shapes
  dir/tokenizer/tokenizer.json      a byte-level BPE (vocab ~1000) trained on the corpus, whose special
                                    tokens have the fixed ids 0..13 of SPECIAL_TOKENS (see DEMO_TOKENS)

Tasks: colour ("What colour is the square?" -> "red"), shape, count ("How many circles are there?" -> "3"),
word, number, compare (two images: "Are the two shapes the same colour?" -> "yes"), multi-turn (colour
then shape), think (count with "<think>...</think>" + "\\boxed{3}"), wide (2:1 picture, left/right shape)
and a little text-only arithmetic. `eval_items` + `is_correct` / `score` are the exact-match evaluation.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from collections import defaultdict
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

from sail_dist.config import Config, TokenConfig
from sail_dist.data.answers import answers_match
from sail_dist.data.batch import PackedBatch
from sail_dist.data.records import parse_record

DEMO_VERSION = 1
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<img>", "</img>",
                  "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>"]
DEMO_TOKENS = TokenConfig(pad=0, im_start=1, im_end=2, think_start=3, think_end=4, img_start=5, img_end=6,
                          img_context=7)
DEMO_VOCAB_SIZE = 1000  # upper bound given to the BPE trainer; the tokenizer may be a little smaller

COLOURS = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30),
           "purple": (140, 60, 190), "orange": (245, 130, 30)}
SHAPES = ("circle", "square", "triangle")
WORDS = ("cat", "dog", "sun", "tree", "fish", "bird", "moon", "star", "ship", "car", "book", "cake")
TASKS = {"colour": 0.2, "shape": 0.14, "count": 0.14, "word": 0.1, "number": 0.1, "compare": 0.1,
         "multi_turn": 0.1, "think": 0.05, "wide": 0.05, "text": 0.02}


@dataclass(frozen=True)
class DemoPaths:
    root: str
    train: str
    eval: str
    tokenizer: str  # directory holding tokenizer.json


# ------------------------------------------------------------------------------------------- drawing
def label_font(size: int):
    try:
        return ImageFont.load_default(size=size)  # Pillow's embedded scalable font (needs FreeType)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)


def background(rng: random.Random, w: int, h: int) -> Image.Image:
    g = rng.randint(225, 250)
    return Image.new("RGB", (w, h), (g, g, g))


def _one_shape(rng: random.Random, size: int, shape: str, colour: str) -> Image.Image:
    img = background(rng, size, size)
    s = rng.randint(size // 2, size * 3 // 4)
    x, y = rng.randint(2, size - s - 2), rng.randint(2, size - s - 2)
    draw_shape(ImageDraw.Draw(img), shape, (x, y, x + s, y + s), COLOURS[colour])
    return img


def circles_picture(rng: random.Random, size: int, k: int, colour: str) -> Image.Image:
    img = background(rng, size, size)
    draw = ImageDraw.Draw(img)
    cells = rng.sample(range(9), k)  # a 3x3 grid of slots keeps the circles apart
    cell = size // 3
    r = cell // 3
    for c in cells:
        cx = (c % 3) * cell + cell // 2 + rng.randint(-2, 2)
        cy = (c // 3) * cell + cell // 2 + rng.randint(-2, 2)
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=COLOURS[colour])
    return img


def _text(rng: random.Random, size: int, text: str) -> Image.Image:
    img = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    font = label_font(max(10, size // 3))
    l, t, r, b = draw.textbbox((0, 0), text, font=font)
    x = (size - (r - l)) // 2 - l + rng.randint(-2, 2)
    y = (size - (b - t)) // 2 - t + rng.randint(-2, 2)
    draw.text((x, y), text, fill=(0, 0, 0), font=font)
    return img


def _wide(rng: random.Random, size: int, left: tuple[str, str], right: tuple[str, str]) -> Image.Image:
    img = background(rng, 2 * size, size)
    draw = ImageDraw.Draw(img)
    for i, (shape, colour) in enumerate((left, right)):
        s = size * 2 // 3
        x, y = i * size + (size - s) // 2, (size - s) // 2
        draw_shape(draw, shape, (x, y, x + s, y + s), COLOURS[colour])
    return img


# ------------------------------------------------------------------------------------------- records
def _conv(*turns: str) -> list[dict]:
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": t} for i, t in enumerate(turns)]


def _make(rng: random.Random, task: str, idx: int, split: str, size: int, out: str) -> dict:
    """One record of `task`; writes its pictures under out/images/."""
    name = f"{split}_{idx:05d}"
    pics: list[Image.Image] = []
    colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    if task == "colour":
        pics.append(_one_shape(rng, size, shape, colour))
        conv = _conv(f"<image>\nWhat colour is the {shape}?", colour)
    elif task == "shape":
        pics.append(_one_shape(rng, size, shape, colour))
        conv = _conv("<image>\nWhat shape is this?", shape)
    elif task in ("count", "think"):
        k = rng.randint(1, 5)
        pics.append(circles_picture(rng, size, k, colour))
        if task == "count":
            conv = _conv("<image>\nHow many circles are there?", str(k))
        else:
            steps = ", ".join(str(i) for i in range(1, k + 1))
            conv = _conv("<image>\nHow many circles are there? Think step by step.",
                         f"<think>\nI count the circles one by one: {steps}.\n</think>\n\n\\boxed{{{k}}}")
    elif task == "word":
        word = rng.choice(WORDS)
        pics.append(_text(rng, size, word))
        conv = _conv("<image>\nWhat word is written?", word)
    elif task == "number":
        n = str(rng.randint(0, 99))
        pics.append(_text(rng, size, n))
        conv = _conv("<image>\nWhat number is written?", n)
    elif task == "compare":
        same = rng.random() < 0.5
        other = colour if same else rng.choice([c for c in COLOURS if c != colour])
        pics += [_one_shape(rng, size, shape, colour), _one_shape(rng, size, rng.choice(SHAPES), other)]
        conv = _conv("<image>\n<image>\nAre the two shapes the same colour?", "yes" if same else "no")
    elif task == "multi_turn":
        pics.append(_one_shape(rng, size, shape, colour))
        conv = _conv("<image>\nWhat colour is the shape?", colour, "And what shape is it?", shape)
    elif task == "wide":
        right = (rng.choice(SHAPES), rng.choice(list(COLOURS)))
        side = rng.choice(("left", "right"))
        pics.append(_wide(rng, size, (shape, colour), right))
        conv = _conv(f"<image>\nWhat colour is the {side} shape?", colour if side == "left" else right[1])
    else:  # text: a little arithmetic so text-only samples exist
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        conv = _conv(f"What is {a} plus {b}?", str(a + b))
    paths = []
    for i, img in enumerate(pics):
        rel = f"images/{name}_{i}.png"
        img.save(os.path.join(out, rel), compress_level=1)
        paths.append(rel)
    rec: dict = {"id": name, "task": task}
    if len(paths) == 1:
        rec["image"] = paths[0]
    elif paths:
        rec["images"] = paths
    rec["conversations"] = conv
    return rec


def _corpus_texts(records: list[dict]) -> list[str]:
    texts = [t["value"].replace("<image>", "") for r in records for t in r["conversations"]]
    # role headers and frame labels the template adds, so they tokenize compactly
    texts += ["system\n", "user\n", "assistant\n", "Frame1: Frame2: Frame3:"] * 50
    return texts


def _train_tokenizer(texts: list[str], out_dir: str) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=DEMO_VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    for i, t in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(t) != i:
            raise RuntimeError(f"demo tokenizer: {t} got id {tok.token_to_id(t)}, expected {i}")
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:  # for transformers users
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>",
                   "pad_token": "<|endoftext|>", "additional_special_tokens": SPECIAL_TOKENS[3:]}, f, indent=1)


def generate_demo(root: str, n_train: int = 2000, n_eval: int = 200, image_size: int = 112,
                  seed: int = 0) -> DemoPaths:
    """Write the demo dataset into `root` (replaced if present). Deterministic in (n_train, n_eval, size, seed)."""
    root = os.path.abspath(root)
    parent = os.path.dirname(root)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".demo-", dir=parent)
    try:
        os.makedirs(os.path.join(tmp, "images"))
        rng = random.Random(seed)
        names, weights = list(TASKS), list(TASKS.values())
        splits = {}
        for split, n in (("train", n_train), ("eval", n_eval)):
            splits[split] = [_make(rng, rng.choices(names, weights)[0], i, split, image_size, tmp) for i in range(n)]
            with open(os.path.join(tmp, f"{split}.jsonl"), "w") as f:
                for r in splits[split]:
                    f.write(json.dumps(r) + "\n")
        _train_tokenizer(_corpus_texts(splits["train"]), os.path.join(tmp, "tokenizer"))
        with open(os.path.join(tmp, "DONE"), "w") as f:
            json.dump(_marker(n_train, n_eval, image_size, seed), f)
        if os.path.isdir(root):
            shutil.rmtree(root)
        try:
            os.rename(tmp, root)
        except OSError:  # another process finished first: keep its copy if it is the one we want
            if not _valid(root, n_train, n_eval, image_size, seed):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _paths(root)


def _marker(n_train, n_eval, image_size, seed) -> dict:
    return {"version": DEMO_VERSION, "n_train": n_train, "n_eval": n_eval, "image_size": image_size, "seed": seed}


def _valid(root, *params) -> bool:
    try:
        with open(os.path.join(root, "DONE")) as f:
            return json.load(f) == _marker(*params)
    except (OSError, ValueError):
        return False


def _paths(root: str) -> DemoPaths:
    return DemoPaths(root, os.path.join(root, "train.jsonl"), os.path.join(root, "eval.jsonl"),
                     os.path.join(root, "tokenizer"))


def ensure_demo(root: str, n_train: int = 2000, n_eval: int = 200, image_size: int = 112, seed: int = 0) -> DemoPaths:
    """The demo dataset in `root`, generated on first use (or when its parameters or version changed).

    Safe when every rank of a job calls it at once: a file lock lets one process generate while the others wait.
    """
    import fcntl

    root = os.path.abspath(root)
    if _valid(root, n_train, n_eval, image_size, seed):
        return _paths(root)
    os.makedirs(os.path.dirname(root), exist_ok=True)
    with open(root + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _valid(root, n_train, n_eval, image_size, seed):
            generate_demo(root, n_train, n_eval, image_size, seed)
    return _paths(root)


# ------------------------------------------------------------------------------------------- evaluation
@dataclass
class EvalItem:
    """One held-out question: generate greedily from `prompt` and compare with `is_correct(text, answer)`."""

    sample_id: str
    task: str
    prompt: PackedBatch  # one sample ending in "<|im_start|>assistant\n"; no loss
    answer: str  # reference answer text (think records: the full "<think>...</think>\n\n\\boxed{k}")

    @property
    def input_ids(self) -> list[int]:
        return self.prompt.input_ids.tolist()


def eval_items(cfg: Config, limit: int | None = None, builder=None) -> list[EvalItem]:
    """The demo's eval split as prompts + reference answers (the last assistant turn of each record)."""
    from sail_dist.data.samples import SampleBuilder, default_tokenizer_dir

    paths = ensure_demo(cfg.data.demo_dir)
    builder = builder or SampleBuilder.from_config(cfg, default_tokenizer_dir(cfg))
    items = []
    with open(paths.eval) as f:
        for lineno, line in enumerate(f, 1):
            if limit is not None and len(items) >= limit:
                break
            rec = parse_record(line, f"{paths.eval}:{lineno}", f"demo-eval:{lineno}", paths.root)
            prompt, answer = builder.prompt(rec)
            items.append(EvalItem(rec.sample_id, json.loads(line).get("task", ""), prompt, answer))
    return items


def is_correct(prediction: str, answer: str) -> bool:
    """The project's one answer matcher (sail_dist/data/answers.py answers_match): on the demo's word / digit /
    `\\boxed{k}` answers it is the exact match of the final answers (case, spacing, quotes, a final full stop)."""
    return answers_match(prediction, answer)


def score(items: list[EvalItem], predictions: list[str]) -> dict[str, float]:
    """Accuracy overall ("all") and per task, for generations aligned with `items`."""
    hits: dict[str, list[bool]] = defaultdict(list)
    for item, pred in zip(items, predictions, strict=True):
        ok = is_correct(pred, item.answer)
        hits["all"].append(ok)
        hits[item.task].append(ok)
    return {k: sum(v) / len(v) for k, v in sorted(hits.items())}
