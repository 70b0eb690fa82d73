"""Video data sets in the FOMM/TPSMM layout.

``<root_dir>/train/<video>`` and ``<root_dir>/test/<video>``, where a video is one of
- a folder of frames (``.png``/``.jpg``/``.jpeg``/``.bmp``, in sorted file-name order),
- an ``.mp4``/``.mov`` (decoded by the ffmpeg of imageio-ffmpeg, streamed: a training item decodes
  only up to its later frame and keeps the two it needs; no size limit on long videos),
- a ``.gif`` (Pillow, frames seeked one by one),
- one ``.png``/``.jpg`` strip of frames concatenated left to right (needs ``frame_shape``).
Grey, palette and RGBA frames become RGB (alpha dropped, like FOMM). Frames are not resized: with
``frame_shape`` set, a frame of another size is an error.

Items (float32, values in [0, 1], channels first):
- training: ``{'source': (C, H, W), 'driving': (C, H, W), 'name': str}``, two frames drawn with
  replacement and sorted in time, then augmented identically (augmentation.py);
- evaluation: ``{'video': (C, T, H, W), 'name': str}`` with every frame.
``name`` is the entry's file or folder name as listed in the split (``00012.mp4``, ``id#vid#clip``).

Randomness: each item draws a seed from torch's global generator (seeded per DataLoader worker by
PyTorch, and by ``torch.manual_seed`` in the main process) and uses a ``numpy.random.Generator``.
"""

import os

import numpy as np
import torch
from PIL import Image, ImageSequence, UnidentifiedImageError
from torch.utils.data import Dataset

from augmentation import Augmentation

VIDEO_EXTENSIONS = (".mp4", ".mov", ".gif")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")
STRIP_EXTENSIONS = (".png", ".jpg", ".jpeg")


class DatasetError(ValueError):
    """A data problem; the message is one line naming the path.

    Raised in a DataLoader worker process, it reaches the main process as ``DatasetError(<the worker's
    whole traceback>)`` (that is how PyTorch re-raises worker errors); the constructor keeps the
    traceback's last line, the original message, so the error is the same one line with any number of
    workers.
    """

    _WORKER = "Caught DatasetError in DataLoader worker"

    def __init__(self, message):
        text = str(message)
        if text.startswith(self._WORKER):
            last = [line for line in text.splitlines() if line.strip()][-1]
            _, found, original = last.partition("DatasetError: ")
            text = original if found else last
        super().__init__(text)


def _first_line(error):
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def image_to_rgb(image):
    """A PIL image -> float32 array (H, W, 3) in [0, 1]; grey/palette/RGBA converted, alpha dropped."""
    if image.mode.startswith("I;16") or image.mode == "I":
        grey = np.asarray(image, dtype=np.float32) / 65535.0
        return np.repeat(np.clip(grey, 0.0, 1.0)[..., None], 3, axis=2)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image, dtype=np.float32) / 255.0


def _check_shape(frame, frame_shape, path, index):
    if frame_shape is not None and frame.shape[:2] != tuple(frame_shape[:2]):
        raise DatasetError(f"{path}: frame {index} is {frame.shape[0]}x{frame.shape[1]}, expected "
                           f"{frame_shape[0]}x{frame_shape[1]} (dataset_params.frame_shape)")


def _frame_files(path):
    names = sorted(name for name in os.listdir(path)
                   if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS))
    if not names:
        raise DatasetError(f"{path}: folder holds no frames ({', '.join(IMAGE_EXTENSIONS)})")
    return [os.path.join(path, name) for name in names]


def _open_image(path):
    try:
        image = Image.open(path)
        image.load()
    except (OSError, UnidentifiedImageError, ValueError) as error:
        raise DatasetError(f"{path}: unreadable or corrupt image ({_first_line(error)})") from None
    return image


def _strip_count(path, frame_shape):
    if frame_shape is None:
        raise DatasetError(f"{path}: a .png/.jpg strip of frames needs dataset_params.frame_shape")
    try:
        with Image.open(path) as image:
            width, height = image.size
    except (OSError, UnidentifiedImageError) as error:
        raise DatasetError(f"{path}: unreadable or corrupt image ({_first_line(error)})") from None
    frame_h, frame_w = frame_shape[:2]
    if height != frame_h or width % frame_w:
        raise DatasetError(f"{path}: strip of {height}x{width} is not a row of {frame_h}x{frame_w} frames "
                           f"(dataset_params.frame_shape)")
    return width // frame_w


def _imageio_ffmpeg(path):
    """The imageio-ffmpeg module, imported only where an .mp4/.mov is read: its ffmpeg binary is a large
    dependency that a GPU-only stack may lack (then a one-line error naming the file)."""
    try:
        import imageio_ffmpeg
    except ImportError:
        raise DatasetError(f"{path}: reading .mp4/.mov needs imageio-ffmpeg (pip install imageio-ffmpeg); "
                           f"frame folders, .gif and .png strips need nothing more") from None
    return imageio_ffmpeg


def count_frames(path, frame_shape=None):
    """Number of frames of a video entry (folder, strip, .gif, .mp4/.mov)."""
    lower = path.lower()
    if os.path.isdir(path):
        return len(_frame_files(path))
    if lower.endswith(STRIP_EXTENSIONS):
        return _strip_count(path, frame_shape)
    if lower.endswith(".gif"):
        try:
            with Image.open(path) as image:
                return int(getattr(image, "n_frames", 1))
        except (OSError, UnidentifiedImageError) as error:
            raise DatasetError(f"{path}: unreadable or corrupt video ({_first_line(error)})") from None
    if lower.endswith((".mp4", ".mov")):
        try:
            count, _ = _imageio_ffmpeg(path).count_frames_and_secs(path)
        except (OSError, RuntimeError, ValueError) as error:
            raise DatasetError(f"{path}: unreadable or corrupt video ({_first_line(error)})") from None
        if count < 1:
            raise DatasetError(f"{path}: unreadable or corrupt video (no frames decoded)")
        return count
    raise DatasetError(f"{path}: unsupported video entry; expected a folder of frames, "
                       f"{', '.join(VIDEO_EXTENSIONS)} or a {', '.join(STRIP_EXTENSIONS)} strip")


def _read_ffmpeg(path, wanted):
    """Decode an .mp4/.mov up to the last wanted index; returns {index: frame} (streamed, bounded memory).

    ``wanted=None`` keeps every frame (one decoding pass, no separate count).
    """
    imageio_ffmpeg = _imageio_ffmpeg(path)
    last = max(wanted) if wanted is not None else float("inf")
    found = {}
    reader = None
    try:
        reader = imageio_ffmpeg.read_frames(path, pix_fmt="rgb24")
        meta = next(reader)
        width, height = meta["size"]
        for index, buffer in enumerate(reader):
            if wanted is None or index in wanted:
                frame = np.frombuffer(buffer, dtype=np.uint8).reshape(height, width, 3)
                found[index] = frame.astype(np.float32) / 255.0
            if index >= last:
                break
    except (OSError, RuntimeError, ValueError, StopIteration) as error:
        raise DatasetError(f"{path}: unreadable or corrupt video ({_first_line(error)})") from None
    finally:
        if reader is not None:
            reader.close()
    if not found:
        raise DatasetError(f"{path}: unreadable or corrupt video (no frame decoded)")
    if wanted is not None and len(found) < len(wanted):
        raise DatasetError(f"{path}: unreadable or corrupt video (frame {last} requested, "
                           f"{len(found)} of the wanted frames decoded)")
    return found


def _read_gif(path, wanted):
    found = {}
    try:
        with Image.open(path) as image:
            for index, frame in enumerate(ImageSequence.Iterator(image)):
                if index in wanted:
                    found[index] = image_to_rgb(frame)
                if index >= max(wanted):
                    break
    except (OSError, UnidentifiedImageError, ValueError, EOFError) as error:
        raise DatasetError(f"{path}: unreadable or corrupt video ({_first_line(error)})") from None
    if len(found) < len(wanted):
        raise DatasetError(f"{path}: unreadable or corrupt video (frame {max(wanted)} requested)")
    return found


def read_frames(path, indices=None, frame_shape=None):
    """Read frames ``indices`` (default: all, in order) of a video entry.

    Returns a float32 array (N, H, W, 3) in [0, 1] in the order of ``indices`` (repeats allowed).
    Raises DatasetError (one line naming the path) on an unreadable/corrupt file, a strip without
    ``frame_shape`` or a frame whose size differs from ``frame_shape`` (or from the first frame).
    """
    lower = path.lower()
    if indices is None and lower.endswith((".mp4", ".mov")):
        found = _read_ffmpeg(path, None)
        indices = sorted(found)
        return _stack_checked(found, indices, frame_shape, path)
    if indices is None:
        indices = range(count_frames(path, frame_shape))
    indices = [int(index) for index in indices]
    if not indices:
        raise DatasetError(f"{path}: no frame requested")
    wanted = set(indices)
    if os.path.isdir(path):
        files = _frame_files(path)
        if max(wanted) >= len(files):
            raise DatasetError(f"{path}: frame {max(wanted)} requested, the folder has {len(files)}")
        found = {}
        for index in sorted(wanted):
            with _open_image(files[index]) as image:
                found[index] = image_to_rgb(image)
    elif lower.endswith(STRIP_EXTENSIONS):
        count = _strip_count(path, frame_shape)
        with _open_image(path) as image:
            strip = image_to_rgb(image)
        frame_w = frame_shape[1]
        found = {index: strip[:, index * frame_w:(index + 1) * frame_w] for index in sorted(wanted)
                 if index < count}
        if len(found) < len(wanted):
            raise DatasetError(f"{path}: frame {max(wanted)} requested, the strip has {count}")
    elif lower.endswith(".gif"):
        found = _read_gif(path, wanted)
    elif lower.endswith((".mp4", ".mov")):
        found = _read_ffmpeg(path, wanted)
    else:
        raise DatasetError(f"{path}: unsupported video entry; expected a folder of frames, "
                           f"{', '.join(VIDEO_EXTENSIONS)} or a {', '.join(STRIP_EXTENSIONS)} strip")
    return _stack_checked(found, indices, frame_shape, path)


def _frame_sequence(path, frame_shape):
    """Every frame of a video entry in order, one (H, W, 3) array at a time (uint8, or float32 in [0, 1]
    for 16-bit images), decoded lazily; an .png/.jpg strip is decoded once (as uint8) and sliced."""
    lower = path.lower()
    if os.path.isdir(path):
        for file in _frame_files(path):
            with _open_image(file) as image:
                yield image_to_rgb(image)
    elif lower.endswith(STRIP_EXTENSIONS):
        count = _strip_count(path, frame_shape)
        with _open_image(path) as image:
            strip = image_to_rgb(image) if image.mode.startswith("I") else np.asarray(image.convert("RGB"))
        frame_w = frame_shape[1]
        for index in range(count):
            yield strip[:, index * frame_w:(index + 1) * frame_w]
    elif lower.endswith(".gif"):
        try:
            with Image.open(path) as image:
                for frame in ImageSequence.Iterator(image):
                    yield image_to_rgb(frame)
        except (OSError, UnidentifiedImageError, ValueError, EOFError) as error:
            raise DatasetError(f"{path}: unreadable or corrupt video ({_first_line(error)})") from None
    elif lower.endswith((".mp4", ".mov")):
        reader = None
        try:
            reader = _imageio_ffmpeg(path).read_frames(path, pix_fmt="rgb24")
            width, height = next(reader)["size"]
            for buffer in reader:
                yield np.frombuffer(buffer, dtype=np.uint8).reshape(height, width, 3)
        except (OSError, RuntimeError, ValueError, StopIteration) as error:
            raise DatasetError(f"{path}: unreadable or corrupt video ({_first_line(error)})") from None
        finally:
            if reader is not None:
                reader.close()
    else:
        raise DatasetError(f"{path}: unsupported video entry; expected a folder of frames, "
                           f"{', '.join(VIDEO_EXTENSIONS)} or a {', '.join(STRIP_EXTENSIONS)} strip")


def iter_frames(path, chunk_size, frame_shape=None):
    """Every frame of a video entry in order, in chunks: float32 arrays (n <= chunk_size, H, W, 3) in
    [0, 1], read lazily, so that memory holds one chunk (plus, for a strip, its decoded uint8 image)
    whatever the video's length. The same checks and one-line errors as :func:`read_frames`."""
    chunk, reference = [], None
    for index, frame in enumerate(_frame_sequence(path, frame_shape)):
        _check_shape(frame, frame_shape, path, index)
        if reference is None:
            reference = frame.shape
        elif frame.shape != reference:
            raise DatasetError(f"{path}: frame {index} is {frame.shape[0]}x{frame.shape[1]}, "
                               f"frame 0 is {reference[0]}x{reference[1]}")
        chunk.append(frame.astype(np.float32) / 255.0 if frame.dtype == np.uint8 else frame)
        if len(chunk) == chunk_size:
            yield np.stack(chunk)
            chunk = []
    if chunk:
        yield np.stack(chunk)
    elif reference is None:
        raise DatasetError(f"{path}: unreadable or corrupt video (no frame decoded)")


def _stack_checked(found, indices, frame_shape, path):
    """Stack ``found[i] for i in indices`` after checking every frame's size."""
    reference = found[indices[0]].shape
    for index in sorted(set(indices)):
        _check_shape(found[index], frame_shape, path, index)
        if found[index].shape != reference:
            raise DatasetError(f"{path}: frame {index} is {found[index].shape[0]}x{found[index].shape[1]}, "
                               f"frame {indices[0]} is {reference[0]}x{reference[1]}")
    return np.stack([found[index] for index in indices])


def _is_video_entry(split_dir, name):
    if name.startswith("."):
        return False
    if os.path.isdir(os.path.join(split_dir, name)):
        return True
    return name.lower().endswith(VIDEO_EXTENSIONS + STRIP_EXTENSIONS)


def _item_seed():
    return int(torch.randint(0, 2 ** 62, (1,)).item())


class FramesDataset(Dataset):
    """Videos of ``<root_dir>/train`` (``is_train``) or ``<root_dir>/test``; see the module docstring.

    Args:
        root_dir: the data set folder (must hold ``train/`` and ``test/``).
        frame_shape: ``[H, W]`` or ``[H, W, C]``; required for strips; frames of another size are an error.
        id_sampling: training only: an item is an identity (name prefix before the first ``#``),
            the video is drawn among that identity's videos; ``len`` = number of identities.
        is_train: training items (pairs, augmented) or evaluation items (whole videos).
        augmentation_params: ``dataset_params.augmentation_params`` (training only; None = none).
    """

    def __init__(self, root_dir, frame_shape, id_sampling, is_train, augmentation_params):
        root_dir = str(root_dir)
        if not os.path.isdir(root_dir):
            raise DatasetError(f"dataset root_dir not found: {root_dir} (dataset_params.root_dir)")
        split = "train" if is_train else "test"
        self.split_dir = os.path.join(root_dir, split)
        if not os.path.isdir(self.split_dir):
            raise DatasetError(f"{self.split_dir} not found: the layout is <root_dir>/train and <root_dir>/test")
        entries = sorted(os.listdir(self.split_dir))
        self.videos = [name for name in entries if _is_video_entry(self.split_dir, name)]
        if not self.videos:
            raise DatasetError(f"{self.split_dir} holds no videos (folders of frames, "
                               f"{', '.join(VIDEO_EXTENSIONS + STRIP_EXTENSIONS)}; {len(entries)} other entries)")
        if frame_shape is not None and len(frame_shape) not in (2, 3):
            raise DatasetError(f"{root_dir}: frame_shape must be [H, W] or [H, W, C], got {frame_shape}")
        self.frame_shape = tuple(frame_shape) if frame_shape is not None else None
        if self.frame_shape is None:
            for name in self.videos:
                if name.lower().endswith(STRIP_EXTENSIONS):
                    raise DatasetError(f"{os.path.join(self.split_dir, name)}: a .png/.jpg strip of frames "
                                       f"needs dataset_params.frame_shape")
        self.root_dir = root_dir
        self.is_train = is_train
        self.id_sampling = bool(id_sampling) and is_train
        self.augmentation = Augmentation.from_config(augmentation_params) if is_train else None
        if self.id_sampling:
            groups = {}
            for name in self.videos:
                groups.setdefault(name.split("#")[0], []).append(name)
            self.ids = sorted(groups)
            self.videos_of_id = groups
        self._num_frames = {}

    def __len__(self):
        return len(self.ids) if self.id_sampling else len(self.videos)

    def num_frames(self, name):
        """Frame count of the video ``name`` (cached)."""
        if name not in self._num_frames:
            self._num_frames[name] = count_frames(os.path.join(self.split_dir, name), self.frame_shape)
        return self._num_frames[name]

    def iter_video(self, index, chunk_size):
        """Evaluation: the frames of video ``index`` in order, as float32 tensors (n <= chunk_size, C, H, W)
        in [0, 1], read lazily (:func:`iter_frames`); the streaming form of ``self[index]["video"]``."""
        for frames in iter_frames(os.path.join(self.split_dir, self.videos[index]), chunk_size, self.frame_shape):
            yield torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous()

    def __getitem__(self, index):
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items of {self.split_dir}")
        if not self.is_train:
            name = self.videos[index]
            video = read_frames(os.path.join(self.split_dir, name), frame_shape=self.frame_shape)
            return {"video": torch.from_numpy(video).permute(3, 0, 1, 2).contiguous(), "name": name}
        rng = np.random.default_rng(_item_seed())
        if self.id_sampling:
            choices = self.videos_of_id[self.ids[index]]
            name = choices[int(rng.integers(len(choices)))]
        else:
            name = self.videos[index]
        frame_index = np.sort(rng.choice(self.num_frames(name), size=2, replace=True))
        frames = read_frames(os.path.join(self.split_dir, name), frame_index, frame_shape=self.frame_shape)
        clip = torch.from_numpy(frames).permute(0, 3, 1, 2)
        if self.augmentation is not None:
            clip = self.augmentation(clip, rng)
        clip = clip.contiguous()
        return {"source": clip[0], "driving": clip[1], "name": name}


class DatasetRepeater(Dataset):
    """``num_repeats`` passes over ``dataset`` per epoch (fewer, longer epochs for small data sets).

    Unlike FOMM's version, an error of the underlying data set propagates instead of being retried
    forever.
    """

    def __init__(self, dataset, num_repeats):
        if not isinstance(num_repeats, int) or num_repeats < 1:
            raise ValueError(f"num_repeats must be a positive int, got {num_repeats!r}")
        self.dataset = dataset
        self.num_repeats = num_repeats

    def __len__(self):
        return self.num_repeats * len(self.dataset)

    def __getitem__(self, index):
        return self.dataset[index % len(self.dataset)]


def dataset_from_config(dataset_params, is_train):
    """Build the ``FramesDataset`` of a validated ``dataset_params`` section.

    A synthetic data set (``dataset_params.synthetic``) is generated by ``run.py`` (or ``python
    synthetic.py --config ...``) before this is called; a missing ``root_dir`` says so.
    """
    root_dir = dataset_params["root_dir"]
    if dataset_params["synthetic"] and not os.path.isdir(root_dir):
        raise DatasetError(f"dataset root_dir not found: {root_dir} (dataset_params.root_dir); generate the "
                           f"synthetic data set with: python synthetic.py --config <this config>")
    return FramesDataset(root_dir=root_dir, frame_shape=dataset_params["frame_shape"],
                         id_sampling=dataset_params["id_sampling"], is_train=is_train,
                         augmentation_params=dataset_params["augmentation_params"])
