"""Tiling golden tests, patch layout == Conv2d, AnyRes grids, normalisation, frame sampling."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from sail_dist.data.vision import (IMAGENET_MEAN, IMAGENET_STD, VideoError, VisionSpec, anyres_grid, closest_grid,
                                   list_frames, load_video_frames, normalize, patchify, process_image,
                                   sample_frame_indices, tile_patches, video_info)


def internvl_closest(width, height, min_num, max_num, image_size):
    """InternVL's find_closest_aspect_ratio + target_ratios, verbatim in logic, as the oracle."""
    aspect_ratio = width / height
    target_ratios = sorted(set((i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1)
                               for j in range(1, n + 1) if min_num <= i * j <= max_num), key=lambda x: x[0] * x[1])
    best_ratio_diff, best_ratio, area = float("inf"), (1, 1), width * height
    for ratio in target_ratios:
        diff = abs(aspect_ratio - ratio[0] / ratio[1])
        if diff < best_ratio_diff:
            best_ratio_diff, best_ratio = diff, ratio
        elif diff == best_ratio_diff and area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
            best_ratio = ratio
    return best_ratio


@pytest.mark.parametrize("w,h,max_tiles,expect", [
    (448, 448, 12, (1, 1)),      # exactly one tile
    (500, 500, 12, (1, 1)),      # square but small: no upscaling to 2x2
    (1000, 1000, 12, (3, 3)),    # square and large: the biggest square grid that still has the pixels
    (800, 400, 12, (2, 1)),      # 2:1
    (1920, 1080, 12, (4, 2)),    # 16:9 is closest to 2:1; large enough for the 4x2 grid of that ratio
    (300, 900, 12, (1, 3)),      # tall 1:3
    (1000, 1000, 1, (1, 1)),     # max_tiles=1
    (2000, 500, 6, (4, 1)),      # 4:1 within 6 tiles
])
def test_closest_grid_golden(w, h, max_tiles, expect):
    assert closest_grid(w, h, 1, max_tiles, 448) == expect


def test_closest_grid_matches_internvl_on_random_sizes():
    rng = random.Random(0)
    for _ in range(500):
        w, h = rng.randint(20, 4000), rng.randint(20, 4000)
        mx = rng.choice([1, 4, 6, 12])
        size = rng.choice([56, 112, 448])
        assert closest_grid(w, h, 1, mx, size) == internvl_closest(w, h, 1, mx, size), (w, h, mx, size)


def test_tiles_and_thumbnail_count_and_layout():
    spec = VisionSpec(image_size=56, patch_size=14, max_tiles=6)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 100, 3), dtype=np.uint8))
    patches, grids = process_image(img, spec)  # 2:1 -> 2 tiles + thumbnail
    assert grids == [(4, 4)] * 3 and patches.shape == (48, 3 * 14 * 14)
    assert spec.image_grids(100, 50) == grids and spec.tokens(grids) == 12
    # tile 0 = left half of the bicubic resize, tile 1 = right half, then the thumbnail
    big = normalize(img.resize((112, 56), Image.Resampling.BICUBIC))
    np.testing.assert_allclose(patches[:16], patchify(big[:, :56], 14), rtol=0, atol=1e-6)
    np.testing.assert_allclose(patches[16:32], patchify(big[:, 56:], 14), rtol=0, atol=1e-6)
    thumb = normalize(img.resize((56, 56), Image.Resampling.BICUBIC))
    np.testing.assert_allclose(patches[32:], patchify(thumb, 14), rtol=0, atol=1e-6)
    one, g1 = process_image(img.resize((40, 40)), spec)  # one tile: no thumbnail
    assert g1 == [(4, 4)] and one.shape[0] == 16


def test_tile_patches_equals_cropping_each_tile():
    arr = np.random.default_rng(1).standard_normal((3 * 28, 2 * 28, 3)).astype(np.float32)
    got = tile_patches(arr, grid_cols=2, grid_rows=3, tile=28, patch=7)
    want = np.concatenate([patchify(arr[r * 28:(r + 1) * 28, c * 28:(c + 1) * 28], 7)
                           for r in range(3) for c in range(2)])  # InternVL crop order: row-major tiles
    np.testing.assert_array_equal(got, want)


def test_patches_times_conv_weight_equals_conv2d():
    ps, D = 14, 8
    arr = np.random.default_rng(2).standard_normal((28, 42, 3)).astype(np.float32)
    conv = torch.nn.Conv2d(3, D, kernel_size=ps, stride=ps, bias=False)
    x = torch.from_numpy(arr).permute(2, 0, 1)[None]
    want = conv(x)[0].flatten(1).T  # [rows*cols, D], row-major
    got = torch.from_numpy(patchify(arr, ps)) @ conv.weight.reshape(D, -1).T
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_normalisation_constant_image():
    arr = normalize(Image.new("RGB", (4, 4), (255, 0, 128)))
    expect = (np.asarray([1.0, 0.0, 128 / 255], dtype=np.float32) - IMAGENET_MEAN) / IMAGENET_STD
    np.testing.assert_allclose(arr[0, 0], expect, rtol=1e-6)


@pytest.mark.parametrize("w,h", [(1792, 1792), (4000, 3000), (30, 30), (1000, 20), (640, 480)])
def test_anyres_grid_multiple_of_merge_and_capped(w, h):
    rows, cols = anyres_grid(w, h, 14, 2, 16384)
    assert rows % 2 == 0 and cols % 2 == 0 and rows * cols <= 16384 and rows >= 2 and cols >= 2
    if w * h <= 1792 * 1792 and min(w, h) >= 28:
        assert abs(cols / rows - w / h) / (w / h) < 0.1  # native aspect ratio kept


def test_anyres_process_image():
    spec = VisionSpec(mode="anyres", image_size=56, patch_size=14, max_patches=64)
    patches, grids = process_image(Image.new("RGB", (300, 150)), spec)
    (rows, cols), = grids
    assert rows * cols <= 64 and rows % 2 == 0 and cols % 2 == 0 and (rows, cols) == (4, 10)  # floor per side
    assert patches.shape == (rows * cols, 588)


def test_frame_sampling_and_folders(tmp_path):
    assert sample_frame_indices(100, 4) == [12, 37, 62, 87]
    assert sample_frame_indices(3, 16) == [0, 1, 2]
    for i in (1, 2, 10):
        Image.new("RGB", (20, 10), (i * 20, 0, 0)).save(tmp_path / f"frame{i}.png")
    assert [p.rsplit("/", 1)[1] for p in list_frames(str(tmp_path))] == ["frame1.png", "frame2.png", "frame10.png"]
    assert video_info(str(tmp_path)) == (3, (20, 10))
    frames = load_video_frames(str(tmp_path), 2)
    assert [f.getpixel((0, 0))[0] for f in frames] == [20, 200]  # indices 0 and 2: frame1 and frame10


def test_video_file_without_decoder_says_how_to_fix(tmp_path):
    pytest.importorskip("PIL")
    try:
        import av  # noqa: F401
        pytest.skip("PyAV installed")
    except ImportError:
        pass
    try:
        import cv2  # noqa: F401
        pytest.skip("OpenCV installed")
    except ImportError:
        pass
    f = tmp_path / "clip.mp4"
    f.write_bytes(b"\x00" * 100)
    with pytest.raises(VideoError, match="pip install av"):
        video_info(str(f))


def test_video_file_frames_are_sampled_uniformly(tmp_path):
    """A real encoded video (PyAV): 40 frames whose colour encodes the index; 8 sampled frames come back in order."""
    av = pytest.importorskip("av")
    import numpy as np

    from sail_dist.data.vision import load_video_frames, video_info

    path = str(tmp_path / "clip.mp4")
    with av.open(path, "w") as c:
        s = c.add_stream("mpeg4", rate=10)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        s.bit_rate = 20_000_000  # near-lossless, so the colour still names the frame
        for i in range(40):
            img = np.full((48, 64, 3), i * 6, dtype=np.uint8)
            for pkt in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)
    n, (w, h) = video_info(path)
    assert (n, w, h) == (40, 64, 48)
    frames = load_video_frames(path, 8)
    expect = [int((i + 0.5) * 40 / 8) for i in range(8)]  # 2, 7, 12, ...
    got = [float(np.asarray(f).mean()) / 6 for f in frames]
    assert all(abs(g - e) < 0.5 for g, e in zip(got, expect)), (got, expect)


def test_unreadable_video_file_is_a_clear_error(tmp_path):
    pytest.importorskip("av")
    from sail_dist.data.vision import VideoError, load_video_frames

    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"not a video at all")
    with pytest.raises(VideoError, match="broken.mp4"):
        load_video_frames(str(bad), 4)
