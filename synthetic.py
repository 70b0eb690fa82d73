"""Embedded synthetic data set: articulated, bending, textured objects on a drifting textured background.

Writes the FOMM layout (``<root_dir>/train/<video>``, ``<root_dir>/test/<video>``) with no download:
every texture comes from the images bundled with scikit-image (``skimage.data``).

Each video shows one object: an elliptic torso that translates, rotates and "breathes", with 2-4
limbs of 1-2 segments attached at joints on its rim. Every segment rotates about its joint with a
large amplitude and bends smoothly (a time-varying parabolic bend), so the motion is articulated and
non-rigid. The background is a texture under a small global affine drift (translation, rotation,
scale), so that the background predictor has a motion to learn as well.

Rendering is by inverse warping: for every pixel and every part, a closed-form backward map gives
the part's rest coordinates, where the texture is sampled bilinearly and a 1-pixel anti-aliased mask
is evaluated; parts are composited back to front. All frames of a video are rendered at once
(arrays of shape T x H x W), with numpy only.

Determinism: video ``i`` of split ``s`` draws all its parameters from
``numpy.random.default_rng([seed, s, i])``, so the same seed gives identical frames (byte-identical
PNGs) whatever the number of worker processes.

Command line: ``python synthetic.py --config config/synthetic-64.yaml [--force] [--workers N]``.
"""

import argparse
import concurrent.futures
import functools
import json
import os
import shutil
import sys
import time

import numpy as np
from PIL import Image
from skimage import data
from skimage.transform import resize

from configuration import ConfigError, load_config

FORMATS = ("mp4", "frames")
FPS = 25
MP4_QUALITY = 9  # imageio-ffmpeg scale 0-10; 9 -> libx264 crf 5 (visually lossless)
SPLITS = ("train", "test")
PNG_COMPRESSION = 3  # zlib level: fast to write, deterministic

# Images bundled with scikit-image (no download needed); the grey ones are tinted at random.
COLOUR_TEXTURES = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field",
                   "immunohistochemistry", "retina", "colorwheel")
GREY_TEXTURES = ("brick", "grass", "gravel", "camera", "moon", "coins", "clock", "cell", "page", "text")


@functools.lru_cache(maxsize=1)
def _bundled_images():
    """The bundled scikit-image pictures as float32 (H, W, 3) in [0, 1] (grey replicated); cached."""
    images = []
    for name in COLOUR_TEXTURES + GREY_TEXTURES:
        image = np.asarray(getattr(data, name)())
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        images.append((name, image[..., :3].astype(np.float32) / 255.0, name in GREY_TEXTURES))
    return tuple(images)


@functools.lru_cache(maxsize=4)
def texture_pool(size):
    """Textures as float32 (H, W, 3) in [0, 1], downscaled so the short side is ``max(2 * size, 96)``.

    Returns a tuple of ``(name, image, is_grey)``; cached per process.
    """
    target = max(2 * size, 96)
    pool = []
    for name, image, is_grey in _bundled_images():
        scale = target / min(image.shape[:2])
        if scale < 1:
            shape = (round(image.shape[0] * scale), round(image.shape[1] * scale), 3)
            image = resize(image, shape, order=1, anti_aliasing=True).astype(np.float32)
        pool.append((name, np.ascontiguousarray(image), is_grey))
    return tuple(pool)


def _mirror(coord, extent):
    """Reflect coordinates into [0, extent - 1] (mirror padding, period 2 * (extent - 1))."""
    period = np.float32(2 * (extent - 1))
    coord = np.abs(np.mod(coord.astype(np.float32), period))
    return np.where(coord > extent - 1, period - coord, coord)


def sample_bilinear(texture, x, y):
    """Sample ``texture`` (Ht, Wt, 3) at texel coordinates ``x`` (column), ``y`` (row); mirror outside.

    Returns a float32 array of shape ``x.shape + (3,)``.
    """
    height, width = texture.shape[:2]
    x = _mirror(x, width)
    y = _mirror(y, height)
    x0 = np.minimum(x.astype(np.int32), width - 2)
    y0 = np.minimum(y.astype(np.int32), height - 2)
    fx = (x - x0)[..., None]
    fy = (y - y0)[..., None]
    flat = texture.reshape(-1, 3)
    index = y0 * width + x0
    top = np.take(flat, index, axis=0)
    top += (np.take(flat, index + 1, axis=0) - top) * fx
    bottom = np.take(flat, index + width, axis=0)
    bottom += (np.take(flat, index + width + 1, axis=0) - bottom) * fx
    top += (bottom - top) * fy
    return top


def _rotate(x, y, angle):
    """Rotate points (x, y) by ``angle`` radians (broadcasting)."""
    cos, sin = np.cos(angle), np.sin(angle)
    return cos * x - sin * y, sin * x + cos * y


def _wave(rng, num_frames, amplitude, cycles=(0.4, 1.5)):
    """A smooth signal over the video: amplitude * sin(2 pi f t + phase), t in [0, 1], shape (T,)."""
    t = np.linspace(0.0, 1.0, num_frames)
    frequency = rng.uniform(*cycles)
    phase = rng.uniform(0.0, 2.0 * np.pi)
    return amplitude * np.sin(2.0 * np.pi * frequency * t + phase)


def _pick_texture(rng, pool, exclude=None):
    """``(index, texture)`` of the pool, never ``exclude``; grey ones are mapped between two random colours."""
    index = int(rng.integers(len(pool) - (exclude is not None)))
    if exclude is not None and index >= exclude:
        index += 1
    _, image, is_grey = pool[index]
    if is_grey:
        dark, bright = rng.uniform(0.0, 0.4, 3), rng.uniform(0.6, 1.0, 3)
        image = dark + image * (bright - dark)
    return index, image.astype(np.float32)


class _Part:
    """One rigidly-attached, bending part: backward map world -> rest, mask and texture placement."""

    def __init__(self, rng, texture, kind, shape_params):
        self.texture = texture
        self.kind = kind
        self.shape = shape_params
        extent = np.array(texture.shape[1::-1], dtype=np.float64)
        self.tex_origin = rng.uniform(0.25, 0.75, 2) * extent
        self.tex_angle = rng.uniform(0.0, 2.0 * np.pi)
        self.tex_scale = rng.uniform(0.7, 1.3)


def _limb_backward(px, py, joint, angle, bend):
    """World (px, py) -> limb rest (u, v): rotate about the joint, then undo the parabolic bend.

    Shapes: px, py (T, H, W); joint (T, 2); angle, bend (T,), broadcast over pixels.
    The forward map is u' = u, v' = v + bend * u^2, then rotation by ``angle`` about ``joint``.
    """
    u, v = _rotate(px - joint[:, 0, None, None], py - joint[:, 1, None, None], -angle[:, None, None])
    return u, v - bend[:, None, None] * u * u


def _limb_forward(u, v, joint, angle, bend):
    """Rest (u, v) (scalars) -> world (T, 2), the inverse of ``_limb_backward``."""
    x, y = _rotate(u, v + bend * u * u, angle)
    return np.stack([joint[:, 0] + x, joint[:, 1] + y], axis=1)


def render_video(seed, split_index, video_index, num_frames, size):
    """Render one video as uint8 frames of shape (T, size, size, 3); deterministic in its arguments."""
    rng = np.random.default_rng([seed, split_index, video_index])
    pool = texture_pool(size)
    s = float(size)
    grid = np.arange(size, dtype=np.float64) + 0.5
    px = np.broadcast_to(grid[None, None, :], (num_frames, size, size))
    py = np.broadcast_to(grid[None, :, None], (num_frames, size, size))

    # Background: texture under a small global affine drift (translation, rotation, scale).
    bg_index, bg_texture = _pick_texture(rng, pool)
    bg_shift = np.stack([_wave(rng, num_frames, 0.04 * s), _wave(rng, num_frames, 0.04 * s)], axis=1)
    bg_angle = _wave(rng, num_frames, np.deg2rad(3.0))
    bg_scale = 1.0 + _wave(rng, num_frames, 0.04)
    bg_density = rng.uniform(0.8, 1.3) * min(bg_texture.shape[:2]) / (2.0 * s)
    bg_centre = rng.uniform(0.3, 0.7, 2) * np.array(bg_texture.shape[1::-1])
    qx, qy = _rotate(px - s / 2 - bg_shift[:, 0, None, None], py - s / 2 - bg_shift[:, 1, None, None],
                     -bg_angle[:, None, None])
    factor = bg_density / bg_scale[:, None, None]
    frames = sample_bilinear(bg_texture, bg_centre[0] + factor * qx, bg_centre[1] + factor * qy)
    frames *= np.float32(rng.uniform(0.6, 0.9))

    # Object: torso pose, breathing and bend.
    _, object_texture = _pick_texture(rng, pool, exclude=bg_index)
    object_scale = rng.uniform(0.85, 1.15) * s
    centre = (rng.uniform(0.4, 0.6, 2) * s)[None, :] + np.stack(
        [_wave(rng, num_frames, 0.12 * s), _wave(rng, num_frames, 0.12 * s)], axis=1)
    torso_angle = rng.uniform(-np.pi, np.pi) + _wave(rng, num_frames, np.deg2rad(30.0))
    breathe = 1.0 + _wave(rng, num_frames, 0.1, cycles=(1.0, 2.5))
    semi_a, semi_b = rng.uniform(0.13, 0.18) * object_scale, rng.uniform(0.08, 0.12) * object_scale
    torso_bend = _wave(rng, num_frames, rng.uniform(0.1, 0.35) / semi_a)
    torso = _Part(rng, object_texture, "ellipse", (semi_a, semi_b))

    def torso_backward(x, y):
        u, v = _rotate(x - centre[:, 0, None, None], y - centre[:, 1, None, None], -torso_angle[:, None, None])
        u = u / breathe[:, None, None]
        v = v * breathe[:, None, None]
        return u, v - torso_bend[:, None, None] * u * u

    def torso_forward(u, v):
        x, y = _rotate(u * breathe, (v + torso_bend * u * u) / breathe, torso_angle)
        return np.stack([centre[:, 0] + x, centre[:, 1] + y], axis=1)

    # Limbs: 2-4, each of 1-2 segments, attached on the torso rim.
    num_limbs = int(rng.integers(2, 5))
    anchors = np.linspace(0.0, 2.0 * np.pi, num_limbs, endpoint=False) + rng.uniform(0.0, 2.0 * np.pi)
    anchors += rng.uniform(-0.3, 0.3, num_limbs)
    segments = []  # (part, joint (T,2), angle (T,), bend (T,), in_front)
    for anchor in anchors:
        joint = torso_forward(0.85 * semi_a * np.cos(anchor), 0.85 * semi_b * np.sin(anchor))
        direction = torso_angle + anchor
        in_front = bool(rng.random() < 0.4)
        for _ in range(int(rng.integers(1, 3))):
            length = rng.uniform(0.16, 0.26) * object_scale
            width = rng.uniform(0.035, 0.06) * object_scale
            angle = direction + _wave(rng, num_frames, np.deg2rad(rng.uniform(30.0, 70.0)))
            bend = _wave(rng, num_frames, rng.uniform(0.1, 0.5) / length)
            part = _Part(rng, object_texture, "capsule", (length, width))
            segments.append((part, joint, angle, bend, in_front))
            joint = _limb_forward(length, 0.0, joint, angle, bend)
            direction = angle + np.arctan(2.0 * bend * length)

    canvas = frames.reshape(-1, 3)

    def composite(part, u, v):
        """Alpha-blend ``part`` (rest coordinates u, v of every pixel, T x H x W) over ``frames``."""
        if part.kind == "ellipse":
            a, b = part.shape
            radius = np.sqrt((u / a) ** 2 + (v / b) ** 2)
            alpha = np.clip(0.5 - (radius - 1.0) * min(a, b), 0.0, 1.0).ravel()
            inside = np.flatnonzero(alpha)
            profile = np.minimum(radius.ravel()[inside], 1.0)
        else:
            length, width = part.shape
            across = np.sqrt((u - np.clip(u, 0.0, length)) ** 2 + v ** 2)
            alpha = np.clip(0.5 - (across - width), 0.0, 1.0).ravel()
            inside = np.flatnonzero(alpha)
            profile = np.minimum(across.ravel()[inside] / width, 1.0)
        tu, tv = _rotate(u.ravel()[inside], v.ravel()[inside], part.tex_angle)
        colour = sample_bilinear(part.texture, part.tex_origin[0] + part.tex_scale * tu,
                                 part.tex_origin[1] + part.tex_scale * tv)
        colour *= (1.0 - 0.35 * profile * profile).astype(np.float32)[:, None]
        below = canvas[inside]
        canvas[inside] = below + (colour - below) * alpha[inside].astype(np.float32)[:, None]

    for part, joint, angle, bend, in_front in segments:
        if not in_front:
            composite(part, *_limb_backward(px, py, joint, angle, bend))
    composite(torso, *torso_backward(px, py))
    for part, joint, angle, bend, in_front in segments:
        if in_front:
            composite(part, *_limb_backward(px, py, joint, angle, bend))
    return np.clip(np.rint(frames * 255.0), 0, 255).astype(np.uint8)


def write_video(frames, path, video_format):
    """Write uint8 frames (T, H, W, 3) as ``path + '.mp4'`` or as the folder ``path/0000.png ...``."""
    if video_format == "frames":
        os.makedirs(path)
        for index, frame in enumerate(frames):
            Image.fromarray(frame).save(os.path.join(path, f"{index:04d}.png"), compress_level=PNG_COMPRESSION)
        return
    if video_format != "mp4":
        raise ValueError(f"unknown synthetic video format {video_format!r}; expected one of {FORMATS}")
    import imageio_ffmpeg  # only where video is written: the ffmpeg binary is an optional, large dependency

    height, width = frames.shape[1:3]
    writer = imageio_ffmpeg.write_frames(path + ".mp4", (width, height), fps=FPS, codec="libx264",
                                         quality=MP4_QUALITY, macro_block_size=2, ffmpeg_log_level="error",
                                         output_params=["-threads", "1", "-bitexact"])
    writer.send(None)
    for frame in frames:
        writer.send(np.ascontiguousarray(frame))
    writer.close()


def _render_and_write(job):
    seed, split_index, video_index, num_frames, size, video_format, path = job
    write_video(render_video(seed, split_index, video_index, num_frames, size), path, video_format)
    return path


def _check_params(seed, num_train, num_test, num_frames, size, video_format):
    for name, value, low in (("num_train", num_train, 1), ("num_test", num_test, 1),
                             ("num_frames", num_frames, 2), ("size", size, 16), ("seed", seed, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"synthetic.{name} must be an int >= {low}, got {value!r}")
    if video_format not in FORMATS:
        raise ValueError(f"synthetic.format must be one of {', '.join(FORMATS)}, got {video_format!r}")
    if video_format == "mp4" and size % 2:
        raise ValueError(f"synthetic.size must be even for mp4 (yuv420p), got {size}")


def generate_dataset(root_dir, seed, num_train, num_test, num_frames, size, format, workers=None, force=False):
    """Render the synthetic data set into ``root_dir`` (FOMM layout); returns ``root_dir``.

    Videos are named ``00000`` ... (``.mp4`` files or folders of ``0000.png`` ...). The layout is built
    in a temporary sibling folder and moved into place at the end, so an interrupted run leaves no
    half-written data set. ``root_dir/synthetic.json`` records the parameters.

    Args:
        format: ``"mp4"`` (libx264, crf 5, yuv420p) or ``"frames"`` (lossless PNG folders).
        workers: processes (default: the CPU count); the output does not depend on it.
        force: replace an existing ``root_dir``; otherwise an existing one is an error.
    """
    _check_params(seed, num_train, num_test, num_frames, size, format)
    root_dir = os.path.normpath(str(root_dir))
    if os.path.exists(root_dir) and not force:
        raise FileExistsError(f"{root_dir} exists; pass force=True (--force) to regenerate it")
    staging = f"{root_dir}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    jobs = []
    for split_index, (split, count) in enumerate(zip(SPLITS, (num_train, num_test), strict=True)):
        os.makedirs(os.path.join(staging, split))
        for video_index in range(count):
            path = os.path.join(staging, split, f"{video_index:05d}")
            jobs.append((seed, split_index, video_index, num_frames, size, format, path))
    workers = workers or os.cpu_count() or 1
    try:
        if workers == 1:
            for job in jobs:
                _render_and_write(job)
        else:
            with concurrent.futures.ProcessPoolExecutor(max_workers=workers) as pool:
                for _ in pool.map(_render_and_write, jobs, chunksize=8):
                    pass
        params = {"seed": seed, "num_train": num_train, "num_test": num_test, "num_frames": num_frames,
                  "size": size, "format": format}
        with open(os.path.join(staging, "synthetic.json"), "w", encoding="utf-8") as handle:
            json.dump(params, handle, indent=1, sort_keys=True)
        if os.path.exists(root_dir):
            shutil.rmtree(root_dir)
        parent = os.path.dirname(root_dir)
        if parent:
            os.makedirs(parent, exist_ok=True)
        os.replace(staging, root_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root_dir


def ensure_dataset(dataset_params, workers=None):
    """Generate the synthetic data set when ``root_dir`` is missing and ``synthetic`` params are set.

    Prints one line when it generates. Returns True when it generated, False otherwise (an existing
    ``root_dir`` is used as it is; a missing one without ``synthetic`` params is left to the loader's
    error).
    """
    root_dir = dataset_params["root_dir"]
    synthetic = dataset_params.get("synthetic")
    if os.path.exists(root_dir) or not synthetic:
        return False
    start = time.perf_counter()
    generate_dataset(root_dir, workers=workers, **synthetic)
    print(f"Generated the synthetic data set in {root_dir} ({synthetic['num_train']} train + "
          f"{synthetic['num_test']} test videos of {synthetic['num_frames']} frames, "
          f"{synthetic['size']}x{synthetic['size']}, {synthetic['format']}) in "
          f"{time.perf_counter() - start:.1f} s", flush=True)
    return True


def main(argv=None):
    parser = argparse.ArgumentParser(description="Generate the synthetic data set of a config.")
    parser.add_argument("--config", required=True, help="a config with dataset_params.synthetic set")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="override a config key (dotted), repeatable")
    parser.add_argument("--force", action="store_true", help="regenerate when root_dir exists")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: CPU count)")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as error:
        parser.exit(2, f"error: {error}\n")
    dataset_params = config["dataset_params"]
    if not dataset_params["synthetic"]:
        parser.exit(2, f"error: {args.config}: dataset_params.synthetic is not set\n")
    root_dir = dataset_params["root_dir"]
    if os.path.exists(root_dir) and not args.force:
        print(f"{root_dir} exists; nothing to do (--force regenerates it)")
        return 0
    start = time.perf_counter()
    generate_dataset(root_dir, workers=args.workers, force=args.force, **dataset_params["synthetic"])
    print(f"Generated {root_dir} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
