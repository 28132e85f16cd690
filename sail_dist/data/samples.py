"""One record -> its metadata (cheap, every rank) -> its tensors (expensive, only the rank that trains it).

`SampleBuilder.describe` validates a record's media from file headers only (PIL reads the header without
decoding pixels), tokenizes the text with every `<image>` expanded to its exact number of vision tokens,
and returns a `SampleMeta` with the token count and compute cost that packing and balancing need.
`SampleBuilder.collate` decodes the pixels of a pack's samples and builds the `PackedBatch`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from sail_dist.config import Config
from sail_dist.data.balance import CostModel, SampleCost, cost_model_from_config
from sail_dist.data.batch import PackedBatch
from sail_dist.data.records import BadSample, BadSampleLog, Record, handle_bad, pictures_before_video
from sail_dist.data.template import (IGNORE, ChatTemplate, Encoded, apply_think_rules, load_tokenizer, loss_weights,
                                     think_targets)
from sail_dist.data.vision import (VideoError, VisionSpec, image_size, load_image, load_video_frames,
                                   process_frame, process_image, video_info)

PAD_SAMPLE_ID = "<pad>"  # sample id of a padding micro-batch (a rank whose long sample fills its step)


@dataclass
class SampleMeta:
    """Everything about a sample except its pixels."""

    key: tuple  # the loader's unique key (draw index, source, row)
    record: Record
    encoded: Encoded
    grids: list[tuple[int, int]]  # patch grid of every ViT input, in text order
    pictures: list[tuple[str, str, int]]  # ("image", path, n ViT inputs) / ("video", path, n frames), text order
    picture_tokens: list[int]  # vision tokens per picture in text order (each video frame is a picture)
    video_frames: int
    cost: SampleCost
    is_cot: bool = False  # data.think_format=fusion/longcot: the answer has a non-empty thought

    @property
    def n_tokens(self) -> int:
        return len(self.encoded)

    @property
    def sample_id(self) -> str:
        return self.record.sample_id


@dataclass
class Collated:
    batch: PackedBatch
    dropped: list[tuple[str, str, str, str]] = field(default_factory=list)  # (id, reason, where, detail) skipped


class SampleBuilder:
    """Record -> SampleMeta -> PackedBatch, under one config (template, vision spec, cost model, policy)."""

    def __init__(self, template: ChatTemplate, spec: VisionSpec, cost: CostModel, reduction: str = "token",
                 on_bad_sample: str = "error", think_format: str = "none"):
        self.template, self.spec, self.cost = template, spec, cost
        self.reduction, self.on_bad_sample = reduction, on_bad_sample
        self.think_format = think_format  # data.think_format: none | longcot | fusion (template.apply_think_rules)

    @classmethod
    def from_config(cls, cfg: Config, tokenizer_dir: str | None = None) -> "SampleBuilder":
        tok = load_tokenizer(tokenizer_dir or cfg.data.tokenizer)
        if tok.get_vocab_size() > cfg.model.llm.vocab_size:
            raise ValueError(f"the tokenizer has {tok.get_vocab_size()} tokens but model.llm.vocab_size="
                             f"{cfg.model.llm.vocab_size}: set model.llm.vocab_size >= {tok.get_vocab_size()}")
        return cls(ChatTemplate(tok, cfg.model.tokens, cfg.data.system_prompt),
                   VisionSpec.from_config(cfg.model, cfg.data), cost_model_from_config(cfg.model),
                   cfg.data.loss_reduction, cfg.data.on_bad_sample, cfg.data.think_format)

    # ---------------------------------------------------------------------------------------- metadata
    def _image_size(self, rec: Record, i: int) -> tuple[int, int]:
        if rec.image_sizes is not None:
            return rec.image_sizes[i]
        path = rec.images[i]
        try:
            return image_size(path)
        except FileNotFoundError:
            raise BadSample("missing_image", rec.where, f"{path} does not exist") from None
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise BadSample("corrupt_image", rec.where, f"{path}: {e}") from None

    def _video_info(self, rec: Record) -> tuple[int, tuple[int, int]]:
        try:
            n, size = video_info(rec.video)
        except FileNotFoundError:
            raise BadSample("unreadable_video", rec.where, f"{rec.video} does not exist") from None
        except (VideoError, OSError, ValueError) as e:
            raise BadSample("unreadable_video", rec.where, str(e)) from None
        if n <= 0:
            raise BadSample("unreadable_video", rec.where, f"{rec.video} has no frames")
        return n, size

    def describe(self, rec: Record, key: tuple = (), need_labels: bool = True) -> SampleMeta:
        """Validate media headers, apply the think rules (training samples), tokenize, count tokens and cost.
        Raises BadSample (need_labels=False: a prompt record without an assistant turn is fine)."""
        is_cot = False
        if need_labels and self.think_format != "none" and any(t.role == "assistant" for t in rec.turns):
            rec, ans = apply_think_rules(rec, self.think_format)
            is_cot = ans.is_cot
        spec = self.spec
        per_image = [spec.image_grids(*self._image_size(rec, i)) for i in range(len(rec.images))]
        frames: list[list[tuple[int, int]]] = []
        if rec.video is not None:
            n, (w, h) = self._video_info(rec)
            frames = [[spec.frame_grid(w, h)]] * min(n, spec.video_frames)
        before = pictures_before_video(rec.turns)
        ordered = per_image[:before] + frames + per_image[before:]
        pictures = ([("image", p, len(g)) for p, g in zip(rec.images[:before], per_image[:before])]
                    + ([("video", rec.video, len(frames))] if frames else [])
                    + [("image", p, len(g)) for p, g in zip(rec.images[before:], per_image[before:])])
        picture_tokens = [spec.tokens(g) for g in ordered]
        encoded = self.template.encode(rec.turns, picture_tokens, video_frames=len(frames))
        if need_labels and encoded.n_label_tokens == 0:
            raise BadSample("no_assistant_turn", rec.where, "no supervised tokens after templating")
        grids = [g for gs in ordered for g in gs]
        return SampleMeta(key, rec, encoded, grids, pictures, picture_tokens, len(frames),
                          SampleCost.of(self.cost, len(encoded), grids, spec.merge), is_cot)

    # ---------------------------------------------------------------------------------------- pixels
    def pixels(self, meta: SampleMeta) -> tuple[list[np.ndarray], list[tuple[int, int]]]:
        """Decode and patchify a sample's pictures. Raises BadSample."""
        rec = meta.record
        patches, grids = [], []
        for kind, path, _ in meta.pictures:
            if kind == "image":
                try:
                    p, g = process_image(load_image(path), self.spec)
                except FileNotFoundError:
                    raise BadSample("missing_image", rec.where, f"{path} does not exist") from None
                except (OSError, ValueError, Image.DecompressionBombError) as e:
                    raise BadSample("corrupt_image", rec.where, f"{path}: {e}") from None
                patches.append(p)
                grids += g
            else:
                try:
                    frames = load_video_frames(path, self.spec.video_frames)
                except (VideoError, OSError, ValueError) as e:
                    raise BadSample("unreadable_video", rec.where, f"{path}: {e}") from None
                for f in frames:
                    p, g = process_frame(f, self.spec)
                    patches.append(p)
                    grids.append(g)
        if grids != meta.grids:
            raise BadSample("bad_media_field", rec.where, "the decoded pictures do not match their headers "
                            "(or the record's `image_sizes`)")
        return patches, grids

    def collate(self, metas: list[SampleMeta], log: BadSampleLog | None = None) -> Collated:
        """Decode a pack's pictures and build its PackedBatch; an empty pack gives a padding micro-batch.

        A sample whose pixels fail to decode raises (error policy) or is left out and reported (skip).
        With data.think_format=fusion the batch carries the think_fusion objective's marks:
        extras["thought_T"] (1 where the target labels[t] is a token of the answer's think block, tags included)
        and extras["is_cot_S"] (1 for a sample whose answer has a thought); other formats add no extras.
        """
        dropped = []
        ids, labels, weights, pos, cu, sids = [], [], [], [], [0], []
        thought, is_cot = [], []
        patches, grids = [], []
        for m in metas:
            try:
                p, g = self.pixels(m)
            except BadSample as e:
                handle_bad(e, self.on_bad_sample, log if log is not None else BadSampleLog())
                dropped.append((m.sample_id, e.reason, e.where, e.detail))
                continue
            enc = m.encoded
            ids += enc.input_ids
            labels += enc.labels
            weights += loss_weights(enc.labels, self.reduction)
            pos += range(len(enc))
            cu.append(cu[-1] + len(enc))
            sids.append(m.sample_id)
            patches += p
            grids += g
            if self.think_format == "fusion":
                thought += think_targets(enc.labels, self.template.t)
                is_cot.append(float(m.is_cot))
        if not sids:
            return Collated(self.padding_batch(), dropped)
        extras = {"thought_T": torch.tensor(thought, dtype=torch.float32),
                  "is_cot_S": torch.tensor(is_cot, dtype=torch.float32)} if self.think_format == "fusion" else {}
        return Collated(PackedBatch(
            input_ids=torch.tensor(ids, dtype=torch.long),
            labels=torch.tensor(labels, dtype=torch.long),
            position_ids=torch.tensor(pos, dtype=torch.long),
            cu_seqlens=torch.tensor(cu, dtype=torch.int32),
            max_seqlen=max(b - a for a, b in zip(cu[:-1], cu[1:])),
            loss_weight=torch.tensor(weights, dtype=torch.float32),
            pixel_values=torch.from_numpy(np.concatenate(patches)) if patches else None,
            image_grid_hw=torch.tensor(grids, dtype=torch.long) if grids else None,
            sample_ids=sids,
            extras=extras,
        ), dropped)

    def padding_batch(self) -> PackedBatch:
        """A one-token micro-batch with no loss, for a slot the scheduler left empty."""
        return PackedBatch(
            input_ids=torch.tensor([self.template.t.pad], dtype=torch.long),
            labels=torch.tensor([IGNORE], dtype=torch.long),
            position_ids=torch.zeros(1, dtype=torch.long),
            cu_seqlens=torch.tensor([0, 1], dtype=torch.int32),
            max_seqlen=1,
            loss_weight=torch.zeros(1, dtype=torch.float32),
            sample_ids=[PAD_SAMPLE_ID],
            extras={"thought_T": torch.zeros(1), "is_cot_S": torch.zeros(1)} if self.think_format == "fusion" else {},
        )

    # ---------------------------------------------------------------------------------------- prompts
    def prompt(self, rec: Record, key: tuple = ()) -> tuple[PackedBatch, str]:
        """The record up to (not including) its last assistant answer, ending in `<|im_start|>assistant\n`,
        as a one-sample PackedBatch without loss, plus the reference answer text (for evaluation).

        A record whose last turn is not the assistant's (an RL prompt) is encoded whole; its reference is ""."""
        meta = self.describe(rec, key, need_labels=False)
        ends_with_answer = rec.turns[-1].role == "assistant"
        last = len(rec.turns) - 1 if ends_with_answer else len(rec.turns)
        enc = self.template.encode(rec.turns[:last], meta.picture_tokens, video_frames=meta.video_frames,
                                   add_generation_prompt=True)
        patches, grids = self.pixels(meta)
        n = len(enc)
        batch = PackedBatch(
            input_ids=torch.tensor(enc.input_ids, dtype=torch.long),
            labels=torch.full((n,), IGNORE, dtype=torch.long),
            position_ids=torch.arange(n),
            cu_seqlens=torch.tensor([0, n], dtype=torch.int32),
            max_seqlen=n,
            loss_weight=torch.zeros(n, dtype=torch.float32),
            pixel_values=torch.from_numpy(np.concatenate(patches)) if patches else None,
            image_grid_hw=torch.tensor(grids, dtype=torch.long) if grids else None,
            sample_ids=[rec.sample_id],
        )
        return batch, rec.turns[last].text if ends_with_answer else ""


def default_tokenizer_dir(cfg: Config) -> str:
    """data.tokenizer, or the demo tokenizer when running the demo without one."""
    if cfg.data.tokenizer:
        return cfg.data.tokenizer
    if cfg.data.demo:
        return os.path.join(cfg.data.demo_dir, "tokenizer")
    raise ValueError("config key 'data.tokenizer' is empty: set it to a local Hugging Face tokenizer directory")
