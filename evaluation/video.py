"""Video folders of the FOMM layout, matched by name, read as uint8 frames.

A video is a folder of frames, an ``.mp4``/``.mov``/``.gif``, or a ``.png``/``.jpg`` strip of frames
side by side (read with the project's ``frames_dataset`` readers). Its name for matching drops the
video/image extensions at its end, so ``id#vid#clip.mp4`` (real), ``id#vid#clip.mp4.png`` (the
reconstruction strip FOMM, TPSMM and this project write) and a folder ``id#vid#clip`` all match.
A strip's frame size is ``frame_shape`` when given, else the strip's height (square frames); a
generated strip takes the size of its real video's frames.
"""
import os

import numpy as np
from PIL import Image, UnidentifiedImageError

from frames_dataset import STRIP_EXTENSIONS, VIDEO_EXTENSIONS, DatasetError, read_frames

_SUFFIXES = tuple(VIDEO_EXTENSIONS) + tuple(STRIP_EXTENSIONS)


def video_key(name):
    """The matching name of a video entry: trailing video/image extensions removed."""
    key = name
    while True:
        stem, extension = os.path.splitext(key)
        if not stem or extension.lower() not in _SUFFIXES:
            return key
        key = stem


def list_videos(directory):
    """{key: path} of the video entries of ``directory`` (sorted); two entries with one key are an error."""
    if not os.path.isdir(directory):
        raise DatasetError(f"{directory}: not a folder of videos")
    videos = {}
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if name.startswith(".") or not (os.path.isdir(path) or name.lower().endswith(_SUFFIXES)):
            continue
        key = video_key(name)
        if key in videos:
            raise DatasetError(f"{directory}: {os.path.basename(videos[key])} and {name} are both video '{key}'")
        videos[key] = path
    if not videos:
        raise DatasetError(f"{directory}: no videos (folders of frames, {', '.join(_SUFFIXES)})")
    return videos


def _square_strip_shape(path):
    try:
        with Image.open(path) as image:
            width, height = image.size
    except (OSError, UnidentifiedImageError) as error:
        raise DatasetError(f"{path}: unreadable or corrupt image ({str(error).splitlines()[0]})") from None
    if width % height:
        raise DatasetError(f"{path}: strip of {height}x{width} is not a row of square frames; give the frame "
                           f"size (--frame_shape H,W or dataset_params.frame_shape)")
    return (height, height)


def read_video(path, frame_shape=None):
    """(T, H, W, 3) uint8 frames of a video entry (see the module docstring for strips)."""
    if not os.path.isdir(path) and path.lower().endswith(STRIP_EXTENSIONS) and frame_shape is None:
        frame_shape = _square_strip_shape(path)
    frames = read_frames(path, frame_shape=frame_shape)
    return np.clip(np.rint(frames * 255.0), 0, 255).astype(np.uint8)


def read_pair(real_path, generated_path, frame_shape=None):
    """(real, generated) uint8 frames; a different length or frame size is a one-line error."""
    real = read_video(real_path, frame_shape)
    is_strip = not os.path.isdir(generated_path) and generated_path.lower().endswith(STRIP_EXTENSIONS)
    generated = read_video(generated_path, real.shape[1:3] if is_strip else None)
    if generated.shape[0] != real.shape[0]:
        raise DatasetError(f"{generated_path}: {generated.shape[0]} frames, its real video {real_path} has "
                           f"{real.shape[0]}")
    if generated.shape[1:] != real.shape[1:]:
        raise DatasetError(f"{generated_path}: frames of {generated.shape[1]}x{generated.shape[2]}, its real "
                           f"video {real_path} has {real.shape[1]}x{real.shape[2]}")
    return real, generated
