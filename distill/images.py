"""Stage 4 data: image-caption pairs, SigLIP preprocessing, and the caption targets.

Pairs live in a folder: the images plus `captions.json` (a JSON list of {"file", "caption"}) or
`captions.jsonl` (one such object per line); `file` is relative to the folder.

Images are preprocessed as SigLIP's image processor does: RGB, bicubic resize to the tower's
image_size, rescale to [0, 1], normalize with mean 0.5 / std 0.5 (so pixels lie in [-1, 1]).

Caption targets: in stage 4 the teacher is the frozen student's own text path (its text side
does not train in stage 4). Its caption vectors are computed once and cached in a phase-1 target
store (`embed_cache.corpus.prepare.prepare_store_of`, then write_shard/mark_done; looked up by caption
hash with vectors_for).
The store has one "teacher" named `student` whose columns hold the heads side by side in head
order (FC1 first): [fc1 | fc2 | fc3 | fc4]; each head's block is L2-normalised and scaled by
1/sqrt(heads), so rows have norm 1 like every store row. (One teacher per head would not fit the
store's rule that teacher widths share a 32-column block: tiny heads are narrower.) The teacher
spec's `model` field carries a fingerprint of the student's text-side weights, so a cache made
by another student is rebuilt, never reused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import xxhash
from tqdm import tqdm

from distill.data import BlockPlan, WindowedBatches
from distill.errors import DistillError
from distill.model import JasperStudent, image_inputs
from embed_cache.corpus.prepare import prepare_store_of
from embed_cache.errors import CacheError
from embed_cache.store.target_store import TargetStore
from embed_cache.teachers.spec import TeacherSpec

CAPTION_TEACHER = "student"
SIGLIP_MEAN = SIGLIP_STD = 0.5


@dataclass(frozen=True)
class Pair:
    file: str
    caption: str


def load_pairs(folder: str | Path) -> list[Pair]:
    """The folder's image-caption pairs, in file order; every entry is checked up front."""
    folder = Path(folder)
    if (folder / "captions.json").is_file():
        source = folder / "captions.json"
        try:
            entries = json.loads(source.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise DistillError(f"{source} is not valid JSON ({err}).") from err
    elif (folder / "captions.jsonl").is_file():
        source = folder / "captions.jsonl"
        lines = source.read_text(encoding="utf-8").splitlines()
        try:
            entries = [json.loads(line) for line in lines if line.strip()]
        except json.JSONDecodeError as err:
            raise DistillError(f"{source} has a line that is not valid JSON ({err}).") from err
    else:
        raise DistillError(
            f"no captions.json or captions.jsonl in {folder}: stage 4 needs image-caption pairs there, "
            'as a JSON list of {"file": "a.png", "caption": "..."} (set `images:` to the folder).'
        )
    if not isinstance(entries, list) or not entries:
        raise DistillError(f"{source} must hold a non-empty list of {{'file', 'caption'}} objects.")
    pairs = []
    for number, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("file"), str) \
                or not isinstance(entry.get("caption"), str) or not entry["caption"].strip():
            raise DistillError(f"{source} entry {number} ({entry!r}) needs a `file` and a non-empty `caption`.")
        if not (folder / entry["file"]).is_file():
            raise DistillError(f"{source} entry {number}: image {folder / entry['file']} does not exist.")
        pairs.append(Pair(entry["file"], entry["caption"]))
    return pairs


def load_image(path: str | Path, image_size: int) -> torch.Tensor:
    """[3, image_size, image_size] float32 in [-1, 1], as SigLIP's processor makes it."""
    from PIL import Image  # only stage 4 needs Pillow

    with Image.open(path) as image:
        image = image.convert("RGB").resize((image_size, image_size), Image.Resampling.BICUBIC)
        pixels = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy((pixels - SIGLIP_MEAN) / SIGLIP_STD).permute(2, 0, 1).contiguous()


def split_heads(vectors: torch.Tensor, head_dims: list[int]) -> dict[str, torch.Tensor]:
    """[B, sum(head_dims)] cached caption rows -> {"fc1": [B, d1], ...}."""
    parts = torch.split(vectors, list(head_dims), dim=-1)
    return {f"fc{index}": part for index, part in enumerate(parts, start=1)}


def text_fingerprint(model: JasperStudent) -> str:
    """xxh3-64 of the text side's weights (encoder + heads): what the caption targets depend on."""
    return weights_fingerprint(model, skip="vision_tower.")


def weights_fingerprint(module: torch.nn.Module, skip: str | None = None) -> str:
    """xxh3-64 of a module's weights and their names (those starting with `skip` left out)."""
    digest = xxhash.xxh3_64()
    for name, tensor in module.state_dict().items():
        if skip is None or not name.startswith(skip):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def caption_spec(model: JasperStudent, max_length: int) -> TeacherSpec:
    return TeacherSpec(
        name=CAPTION_TEACHER, model=f"frozen-student:{text_fingerprint(model)}",
        dim=sum(model.config.head_dims), max_length=max_length, dtype="float32",
    )


def build_caption_targets(model: JasperStudent, tokenizer, captions: list[str], url: str | Path,
                          max_length: int, batch_size: int = 64, log=print) -> None:
    """Cache the frozen student's caption vectors at `url`; reuse a cache made by the same student."""
    spec = caption_spec(model, max_length)
    try:
        store = TargetStore.open(url, teacher=spec)
        if not store.pending_shards(CAPTION_TEACHER) and (store.lookup_rows(captions) >= 0).all():
            return
    except CacheError:
        pass  # absent, from another student, or unfinished: build it afresh
    report = prepare_store_of(captions, [spec], url)
    store = TargetStore.open(url, mode="r+", teacher=spec)
    scale = len(model.config.head_dims) ** -0.5
    for shard in tqdm(range(store.n_shards), desc="caption targets", unit="shard"):
        heads = model.encode(tokenizer, store.read_texts(*store.shard_range(shard)), batch_size=batch_size,
                             max_length=max_length)
        vectors = np.concatenate([v / np.linalg.norm(v, axis=-1, keepdims=True) for v in heads.values()], axis=-1)
        store.mark_done(CAPTION_TEACHER, shard, store.write_shard(CAPTION_TEACHER, shard, vectors * scale))
    log(f"cached caption targets of {report['rows']} captions in {url}")


def pair_plan(pairs: list[Pair], batch_size: int, seed: int, rank: int, world: int) -> BlockPlan:
    """Images are read one by one anyway, so each pair is its own block: a plain permutation."""
    return BlockPlan(tuple((i, i + 1) for i in range(len(pairs))), batch_size, seed, 1, rank, world)


class ImageBatches(WindowedBatches):
    """Pixels, image placeholder inputs and cached caption targets for stage 4."""

    def __init__(self, plan: BlockPlan, epoch: int, start: int, folder: str, pairs: list[Pair],
                 caption_store: str, tokenizer, config, image_size: int, max_length: int):
        super().__init__(plan, epoch, start)
        self.folder, self.pairs, self.caption_store = Path(folder), pairs, caption_store
        self.tokenizer, self.config = tokenizer, config
        self.image_size, self.max_length = image_size, max_length
        self._store = None

    def read_window(self, rows: np.ndarray) -> dict:
        return {"rows": rows, "pixels": [load_image(self.folder / self.pairs[r].file, self.image_size) for r in rows]}

    def make_batch(self, parts: list) -> dict:
        if self._store is None:
            self._store = TargetStore.open(self.caption_store)
        rows = np.concatenate([batch_rows for batch_rows, _ in parts])
        pixels = [window["pixels"][int(np.flatnonzero(window["rows"] == r)[0])]
                  for batch_rows, window in parts for r in batch_rows]
        # the image alone, no prompt: its vector should land on its caption's
        encoded = image_inputs(self.tokenizer, self.config, [""] * len(rows), self.max_length)
        targets = self._store.vectors_for([self.pairs[r].caption for r in rows])
        return {
            "input_ids": encoded["input_ids"],
            "attention_mask": encoded["attention_mask"],
            "pixel_values": torch.stack(pixels),
            "targets": torch.from_numpy(targets),
            "rows": torch.from_numpy(rows),
        }
