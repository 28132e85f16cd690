"""Images and video frames -> normalised, flattened ViT patches (the PackedBatch vision convention).

Two input modes (`model.vision_input`):
  tiles   InternVL dynamic tiling: pick the grid of cols x rows tiles (min_tiles <= cols*rows <= max_tiles)
          whose aspect ratio is closest to the image, resize (bicubic) to it, cut tiles of
          `vit.image_size` px, and append a whole-image thumbnail tile when there is more than one tile.
          Every tile is one "image" of the batch with the fixed grid (image_size/patch)^2.
  anyres  keep the native aspect ratio: resize so the patch grid is a multiple of the adapter's merge
          (2x2) on both sides, capped at `model.max_anyres_patches` patches; one "image" per picture.

Patches are channel-major and row-major (`patchify`): for one image, `patches @ conv.weight.reshape(D, -1).T`
equals a Conv2d(kernel=stride=patch) output flattened over its (rows, cols) grid.
Video: `video_frames` frames sampled at the midpoints of equal segments of a video file (PyAV or OpenCV,
whichever is installed) or of a folder of frame images; each frame is one tile (anyres: one image capped at
a tile's patch count).
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image

from sail_dist.config import DataConfig, ModelConfig

IMAGENET_MEAN = np.asarray([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.asarray([0.229, 0.224, 0.225], dtype=np.float32)
_FRAME_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


@dataclass(frozen=True)
class VisionSpec:
    """Everything that decides how a picture becomes patches; built from the config by `from_config`."""

    mode: str = "tiles"  # "tiles" | "anyres"
    image_size: int = 448  # tile side in px (vit.image_size)
    patch_size: int = 14
    merge: int = 2  # adapter pixel-shuffle factor: vision tokens = patches / merge^2
    min_tiles: int = 1
    max_tiles: int = 12
    use_thumbnail: bool = True
    max_patches: int = 16384  # anyres cap per image
    video_frames: int = 16

    @classmethod
    def from_config(cls, model: ModelConfig, data: DataConfig) -> "VisionSpec":
        return cls(mode=model.vision_input, image_size=model.vit.image_size, patch_size=model.vit.patch_size,
                   merge=model.adapter.downsample, min_tiles=data.min_tiles, max_tiles=data.max_tiles,
                   use_thumbnail=data.use_thumbnail, max_patches=model.max_anyres_patches,
                   video_frames=data.video_frames)

    @property
    def grid(self) -> int:
        """Patches per side of one tile."""
        return self.image_size // self.patch_size

    def image_grids(self, width: int, height: int) -> list[tuple[int, int]]:
        """Patch grids (rows, cols) of the ViT inputs one picture becomes (tiles: one per tile + thumbnail)."""
        if self.mode == "anyres":
            return [anyres_grid(width, height, self.patch_size, self.merge, self.max_patches)]
        cols, rows = closest_grid(width, height, self.min_tiles, self.max_tiles, self.image_size)
        n = cols * rows + (1 if self.use_thumbnail and cols * rows > 1 else 0)
        return [(self.grid, self.grid)] * n

    def frame_grid(self, width: int, height: int) -> tuple[int, int]:
        """Patch grid of one video frame: one tile, or (anyres) native aspect capped at a tile's patches."""
        if self.mode == "anyres":
            return anyres_grid(width, height, self.patch_size, self.merge, self.grid * self.grid)
        return (self.grid, self.grid)

    def tokens(self, grids: list[tuple[int, int]]) -> int:
        """Vision tokens (= <IMG_CONTEXT> slots) produced by these patch grids after the merge."""
        return sum((r // self.merge) * (c // self.merge) for r, c in grids)


# ------------------------------------------------------------------------------------------- geometry
def closest_grid(width: int, height: int, min_tiles: int, max_tiles: int, image_size: int) -> tuple[int, int]:
    """InternVL's `find_closest_aspect_ratio`: (cols, rows) with min_tiles <= cols*rows <= max_tiles.

    Among equally close aspect ratios the larger grid wins only when the image has more than half of its
    pixels (so small images are not blown up into many tiles).
    """
    aspect = width / height
    grids = sorted({(i, j) for n in range(min_tiles, max_tiles + 1) for i in range(1, n + 1) for j in range(1, n + 1)
                    if min_tiles <= i * j <= max_tiles}, key=lambda g: (g[0] * g[1], g))
    best, best_diff = (1, 1), float("inf")
    area = width * height
    for cols, rows in grids:
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * image_size * image_size * cols * rows:
            best = (cols, rows)
    return best


def anyres_grid(width: int, height: int, patch: int, merge: int, max_patches: int) -> tuple[int, int]:
    """Patch grid (rows, cols) for AnyRes: native aspect, both sides multiples of `merge`, <= max_patches.

    Qwen2-VL's smart_resize rule in patch units: round each side to the merge factor; if over the cap,
    scale both sides down by the same factor (floor), never below one merged token per side.
    """
    f = patch * merge
    rows = max(f, round(height / f) * f) // patch
    cols = max(f, round(width / f) * f) // patch
    if rows * cols > max_patches:
        beta = math.sqrt(height * width / (max_patches * patch * patch))
        rows = max(f, math.floor(height / beta / f) * f) // patch
        cols = max(f, math.floor(width / beta / f) * f) // patch
    while rows * cols > max_patches:  # only for extreme aspect ratios clamped at one merged token
        if rows >= cols:
            rows -= merge
        else:
            cols -= merge
    return rows, cols


# ------------------------------------------------------------------------------------------- pixels
def image_size(path: str) -> tuple[int, int]:
    """(width, height) from the file header only; raises FileNotFoundError or PIL/OS errors."""
    with Image.open(path) as im:
        return im.size


def load_image(path: str) -> Image.Image:
    """Decode a file fully into RGB (truncated files raise OSError instead of being silently padded)."""
    with Image.open(path) as im:
        im.load()
        return im.convert("RGB")


def normalize(img: Image.Image) -> np.ndarray:
    """RGB image -> float32 [H, W, 3], ImageNet mean/std normalised."""
    arr = np.asarray(img.convert("RGB"), dtype=np.float32)
    arr *= 1.0 / 255.0
    arr -= IMAGENET_MEAN
    arr /= IMAGENET_STD
    return arr


def patchify(arr_HWC: np.ndarray, patch: int) -> np.ndarray:
    """[H, W, C] -> [rows*cols, C*patch*patch]: row-major patches, each flattened channel-major (c, y, x)."""
    H, W, C = arr_HWC.shape
    rows, cols = H // patch, W // patch
    x = arr_HWC.reshape(rows, patch, cols, patch, C).transpose(0, 2, 4, 1, 3)
    return np.ascontiguousarray(x).reshape(rows * cols, C * patch * patch)


def tile_patches(arr_HWC: np.ndarray, grid_cols: int, grid_rows: int, tile: int, patch: int) -> np.ndarray:
    """A resized image of grid_rows x grid_cols tiles -> the tiles' patches, tile after tile (row-major tiles).

    Same result as cropping each tile (InternVL order: left to right, top to bottom) and calling `patchify`
    on it, in one reshape.
    """
    g = tile // patch
    C = arr_HWC.shape[2]
    x = arr_HWC.reshape(grid_rows, g, patch, grid_cols, g, patch, C)
    x = x.transpose(0, 3, 1, 4, 6, 2, 5)  # tile row, tile col, patch row, patch col, C, y, x
    return np.ascontiguousarray(x).reshape(grid_rows * grid_cols * g * g, C * patch * patch)


def process_image(img: Image.Image, spec: VisionSpec) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """One picture -> (patches [P, 3*ps*ps] float32, patch grids of its ViT inputs in order)."""
    w, h = img.size
    ps = spec.patch_size
    if spec.mode == "anyres":
        rows, cols = anyres_grid(w, h, ps, spec.merge, spec.max_patches)
        arr = normalize(img.resize((cols * ps, rows * ps), Image.Resampling.BICUBIC))
        return patchify(arr, ps), [(rows, cols)]
    T = spec.image_size
    cols, rows = closest_grid(w, h, spec.min_tiles, spec.max_tiles, T)
    arr = normalize(img.resize((cols * T, rows * T), Image.Resampling.BICUBIC))
    parts = [tile_patches(arr, cols, rows, T, ps)]
    n = cols * rows
    if spec.use_thumbnail and n > 1:
        parts.append(patchify(normalize(img.resize((T, T), Image.Resampling.BICUBIC)), ps))
        n += 1
    return np.concatenate(parts) if len(parts) > 1 else parts[0], [(spec.grid, spec.grid)] * n


def process_frame(img: Image.Image, spec: VisionSpec) -> tuple[np.ndarray, tuple[int, int]]:
    """One video frame -> (patches, grid): a single tile (anyres: native aspect capped at a tile's patches)."""
    rows, cols = spec.frame_grid(*img.size)
    ps = spec.patch_size
    arr = normalize(img.resize((cols * ps, rows * ps), Image.Resampling.BICUBIC))
    return patchify(arr, ps), (rows, cols)


# ------------------------------------------------------------------------------------------- video
class VideoError(OSError):
    """A video cannot be read (no decoder installed, no frames, unreadable file)."""


def sample_frame_indices(total: int, n: int) -> list[int]:
    """`min(n, total)` distinct frame indices at the midpoints of equal segments (InternVL's get_index)."""
    n = min(n, total)
    return [int((i + 0.5) * total / n) for i in range(n)]


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def list_frames(folder: str) -> list[str]:
    """Image files of a frame folder in natural order (frame2 before frame10)."""
    names = [n for n in os.listdir(folder) if n.lower().endswith(_FRAME_EXTS)]
    return [os.path.join(folder, n) for n in sorted(names, key=_natural_key)]


def _video_backend():
    try:
        import av  # noqa: F401
        return "av"
    except ImportError:
        pass
    try:
        import cv2  # noqa: F401
        return "cv2"
    except ImportError:
        return None


def video_info(path: str) -> tuple[int, tuple[int, int]]:
    """(frame count, (width, height)) of a video file or frame folder, without decoding pixels where possible."""
    if os.path.isdir(path):
        frames = list_frames(path)
        if not frames:
            raise VideoError(f"frame folder {path} has no image files ({', '.join(_FRAME_EXTS)})")
        return len(frames), image_size(frames[0])
    if not os.path.exists(path):
        raise FileNotFoundError(path)
    backend = _video_backend()
    if backend == "av":
        import av
        try:
            with av.open(path) as c:
                s = c.streams.video[0]
                n = s.frames or sum(1 for _ in c.decode(s))
                return n, (s.codec_context.width, s.codec_context.height)
        except (av.error.FFmpegError, IndexError) as e:  # type: ignore[attr-defined]
            raise VideoError(f"PyAV cannot read {path}: {e}") from None
    if backend == "cv2":
        import cv2
        cap = cv2.VideoCapture(path)
        try:
            if not cap.isOpened():
                raise VideoError(f"OpenCV cannot open {path}")
            n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
            w, h = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
        finally:
            cap.release()
        if n <= 0:
            raise VideoError(f"OpenCV reports no frames in {path}")
        return n, (w, h)
    raise VideoError(f"cannot read video file {path}: neither PyAV nor OpenCV is installed "
                     "(pip install av), or give a folder of frames instead")


def load_video_frames(path: str, n_frames: int) -> list[Image.Image]:
    """Decode the uniformly sampled frames of a video file or frame folder as RGB images."""
    total, _ = video_info(path)
    want = sample_frame_indices(total, n_frames)
    if os.path.isdir(path):
        frames = list_frames(path)
        return [load_image(frames[i]) for i in want]
    wanted = set(want)
    out: dict[int, Image.Image] = {}
    if _video_backend() == "av":
        import av
        with av.open(path) as c:
            for i, frame in enumerate(c.decode(c.streams.video[0])):
                if i in wanted:
                    out[i] = frame.to_image().convert("RGB")
                if i >= want[-1]:
                    break
    else:
        import cv2
        cap = cv2.VideoCapture(path)
        try:
            for i in want:
                cap.set(cv2.CAP_PROP_POS_FRAMES, i)
                ok, bgr = cap.read()
                if ok:
                    out[i] = Image.fromarray(bgr[:, :, ::-1].copy())
        finally:
            cap.release()
    missing = [i for i in want if i not in out]
    if missing:
        raise VideoError(f"{path}: could not decode frames {missing[:5]} of {total}")
    return [out[i] for i in want]
