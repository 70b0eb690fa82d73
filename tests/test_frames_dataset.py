"""Loader: every video format, items, id sampling, repeater, pairs, and each one-line error."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from frames_dataset import (
    DatasetError,
    DatasetRepeater,
    FramesDataset,
    count_frames,
    dataset_from_config,
    iter_frames,
    read_frames,
)

SIZE = 16
FRAMES = 6


def make_dataset(root, frame_shape=None, id_sampling=False, is_train=True, augmentation_params=None):
    """FramesDataset with the settings a test does not give at their config defaults."""
    return FramesDataset(root, frame_shape=frame_shape, id_sampling=id_sampling, is_train=is_train,
                         augmentation_params=augmentation_params)


def _video(seed, frames=FRAMES, size=SIZE):
    """Smooth uint8 frames (T, H, W, 3): a moving gradient, so lossy codecs keep them close."""
    t = np.arange(frames)[:, None, None]
    y, x = np.mgrid[0:size, 0:size]
    y, x = y[None], x[None]
    red = (x * 12 + t * 9 + seed * 20) % 256
    green = (y * 12 + t * 5) % 256
    blue = np.full_like(red, 60 + 30 * seed)
    return np.stack(np.broadcast_arrays(red, green, blue), axis=-1).astype(np.uint8)


def _write_folder(path, video):
    os.makedirs(path)
    for index, frame in enumerate(video):
        Image.fromarray(frame).save(os.path.join(path, f"{index:03d}.png"))


def _write_mp4(path, video):
    imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg")  # optional where only the GPU stack is installed
    writer = imageio_ffmpeg.write_frames(path, (video.shape[2], video.shape[1]), fps=10, codec="libx264",
                                         quality=10, macro_block_size=2, ffmpeg_log_level="error")
    writer.send(None)
    for frame in video:
        writer.send(np.ascontiguousarray(frame))
    writer.close()


def _write_gif(path, video):
    images = [Image.fromarray(frame) for frame in video]
    images[0].save(path, save_all=True, append_images=images[1:], duration=100, loop=0)


def _write_strip(path, video):
    Image.fromarray(np.concatenate(list(video), axis=1)).save(path)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A data set with one video per format in train/ and a folder + mp4 in test/ (read-only)."""
    base = tmp_path_factory.mktemp("frames") / "data"
    train, test = base / "train", base / "test"
    train.mkdir(parents=True)
    test.mkdir()
    _write_folder(str(train / "a#v1#c1"), _video(0))
    _write_mp4(str(train / "a#v2#c1.mp4"), _video(1))
    _write_gif(str(train / "b#v1#c1.gif"), _video(2))
    _write_strip(str(train / "b#v2#c1.png"), _video(3))
    _write_folder(str(test / "t0"), _video(4))
    _write_mp4(str(test / "t1.mp4"), _video(5))
    (train / "notes.txt").write_text("not a video")
    return str(base)


def test_every_format_reads_back(root):
    train = os.path.join(root, "train")
    exact = {"a#v1#c1": 0, "b#v1#c1.gif": 2, "b#v2#c1.png": 3}
    for name, seed in exact.items():
        path = os.path.join(train, name)
        assert count_frames(path, (SIZE, SIZE, 3)) == FRAMES
        video = read_frames(path, frame_shape=(SIZE, SIZE, 3))
        assert video.dtype == np.float32 and video.shape == (FRAMES, SIZE, SIZE, 3)
        np.testing.assert_allclose(video, _video(seed) / 255.0, atol=1e-6, err_msg=name)
    mp4 = os.path.join(train, "a#v2#c1.mp4")
    assert count_frames(mp4) == FRAMES
    video = read_frames(mp4)
    assert np.abs(video - _video(1) / 255.0).mean() < 0.03


def test_only_the_requested_frames_in_the_requested_order(root):
    for name in ("a#v1#c1", "a#v2#c1.mp4", "b#v1#c1.gif"):
        path = os.path.join(root, "train", name)
        full = read_frames(path)
        picked = read_frames(path, [4, 1, 4])
        np.testing.assert_array_equal(picked, full[[4, 1, 4]])
    with pytest.raises(DatasetError, match="frame 9"):
        read_frames(os.path.join(root, "train", "a#v1#c1"), [9])


def test_grey_and_rgba_become_rgb(tmp_path):
    folder = tmp_path / "v"
    folder.mkdir()
    grey = np.arange(SIZE * SIZE, dtype=np.uint8).reshape(SIZE, SIZE)
    Image.fromarray(grey).save(folder / "0.png")
    rgba = np.dstack([_video(0)[0], np.full((SIZE, SIZE), 7, np.uint8)])
    Image.fromarray(rgba).save(folder / "1.png")
    video = read_frames(str(folder))
    assert video.shape == (2, SIZE, SIZE, 3)
    np.testing.assert_allclose(video[0], np.repeat(grey[..., None] / 255.0, 3, axis=2), atol=1e-6)
    np.testing.assert_allclose(video[1], _video(0)[0] / 255.0, atol=1e-6)


def test_training_items(root):
    augmentation = {"flip_param": {"horizontal_flip": True, "time_flip": True},
                    "jitter_param": {"brightness": 0.1, "contrast": 0.1, "saturation": 0.1, "hue": 0.1}}
    dataset = make_dataset(root, frame_shape=[SIZE, SIZE, 3], is_train=True, augmentation_params=augmentation)
    assert len(dataset) == 4 and "notes.txt" not in dataset.videos
    for index in range(len(dataset)):
        item = dataset[index]
        for key in ("source", "driving"):
            assert item[key].shape == (3, SIZE, SIZE) and item[key].dtype == torch.float32
            assert 0.0 <= item[key].min() and item[key].max() <= 1.0
        assert item["name"] == dataset.videos[index]
    torch.manual_seed(3)
    first = dataset[0]
    torch.manual_seed(3)
    again = dataset[0]
    assert torch.equal(first["source"], again["source"]) and torch.equal(first["driving"], again["driving"])
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=4)))
    assert batch["source"].shape == (4, 3, SIZE, SIZE)


def test_training_pair_is_two_frames_of_the_video(root):
    dataset = make_dataset(root, frame_shape=[SIZE, SIZE, 3], is_train=True)
    frames = read_frames(os.path.join(root, "train", "a#v1#c1"))
    seen = set()
    for seed in range(12):
        torch.manual_seed(seed)
        item = dataset[0]
        source = [k for k in range(FRAMES) if np.array_equal(item["source"].permute(1, 2, 0).numpy(), frames[k])]
        driving = [k for k in range(FRAMES) if np.array_equal(item["driving"].permute(1, 2, 0).numpy(), frames[k])]
        assert len(source) == 1 and len(driving) == 1 and source[0] <= driving[0]
        seen.add((source[0], driving[0]))
    assert len(seen) > 3


def test_evaluation_items(root):
    dataset = make_dataset(root, is_train=False)
    assert dataset.videos == ["t0", "t1.mp4"]
    item = dataset[0]
    assert item["name"] == "t0" and item["video"].shape == (3, FRAMES, SIZE, SIZE)
    np.testing.assert_allclose(item["video"].permute(1, 2, 3, 0).numpy(), _video(4) / 255.0, atol=1e-6)
    assert dataset[1]["video"].shape == (3, FRAMES, SIZE, SIZE)
    with pytest.raises(IndexError):
        dataset[2]


def test_id_sampling(root):
    dataset = make_dataset(root, frame_shape=[SIZE, SIZE, 3], id_sampling=True, is_train=True)
    assert len(dataset) == 2 and dataset.ids == ["a", "b"]
    names = set()
    for seed in range(16):
        torch.manual_seed(seed)
        names.add(dataset[1]["name"])
    assert names == {"b#v1#c1.gif", "b#v2#c1.png"}
    assert len(make_dataset(root, id_sampling=True, is_train=False)) == 2


def test_repeater(root):
    dataset = make_dataset(root, is_train=False)
    repeated = DatasetRepeater(dataset, num_repeats=3)
    assert len(repeated) == 6
    assert repeated[3]["name"] == dataset[1]["name"]
    with pytest.raises(ValueError, match="num_repeats"):
        DatasetRepeater(dataset, num_repeats=0)


def _one_line_error(function, *args, match, **kwargs):
    with pytest.raises(DatasetError) as info:
        function(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    assert match in message, message
    return message


def test_layout_errors(tmp_path, root):
    _one_line_error(make_dataset, str(tmp_path / "absent"), match="root_dir not found: ")
    (tmp_path / "flat").mkdir()
    _one_line_error(make_dataset, str(tmp_path / "flat"), match=os.path.join("flat", "train") + " not found")
    (tmp_path / "empty" / "train").mkdir(parents=True)
    (tmp_path / "empty" / "train" / "readme.md").write_text("x")
    _one_line_error(make_dataset, str(tmp_path / "empty"), match="holds no videos")
    message = _one_line_error(make_dataset, root, match="needs dataset_params.frame_shape")
    assert "b#v2#c1.png" in message


def test_wrong_frame_size(root, tmp_path):
    dataset = make_dataset(root, frame_shape=[SIZE, SIZE + 2, 3], is_train=False)
    message = _one_line_error(dataset.__getitem__, 0, match="frame 0 is 16x16, expected 16x18")
    assert "t0" in message
    _one_line_error(count_frames, os.path.join(root, "train", "b#v2#c1.png"), (SIZE, 5, 3),
                    match="not a row of 16x5 frames")
    mixed = str(tmp_path / "mixed")
    _write_folder(mixed, _video(0))
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(os.path.join(mixed, "999.png"))
    _one_line_error(read_frames, mixed, match="frame 6 is 8x8, frame 0 is 16x16")


def _ffmpeg_installed():
    try:
        import imageio_ffmpeg  # noqa: F401
    except ImportError:
        return False
    return True


def test_corrupt_files(tmp_path):
    for name in ("broken.mp4", "broken.gif", "broken.png"):
        path = tmp_path / name
        path.write_bytes(b"\x00\x01 definitely not a video " * 20)
        # Without imageio-ffmpeg (a GPU-only stack) an .mp4 is refused in one line that says what to install.
        match = "corrupt" if name != "broken.mp4" or _ffmpeg_installed() else "needs imageio-ffmpeg"
        message = _one_line_error(read_frames, str(path), frame_shape=(SIZE, SIZE, 3), match=match)
        assert name in message
    folder = tmp_path / "frames"
    folder.mkdir()
    (folder / "0.png").write_bytes(b"garbage")
    _one_line_error(read_frames, str(folder), match="0.png: unreadable or corrupt image")
    truncated = tmp_path / "cut.mp4"
    _write_mp4(str(truncated), _video(0))
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 3])
    _one_line_error(read_frames, str(truncated), [FRAMES - 1], match="cut.mp4: unreadable or corrupt video")


def test_dataset_from_config(root):
    params = {"root_dir": root, "frame_shape": [SIZE, SIZE, 3], "id_sampling": True, "pairs_list": None,
              "synthetic": None, "augmentation_params": {"flip_param": None, "resize_param": None,
                                                         "crop_param": {"size": [8, 8]}, "jitter_param": None}}
    train = dataset_from_config(params, is_train=True)
    assert len(train) == 2 and train[0]["source"].shape == (3, 8, 8)
    test = dataset_from_config(params, is_train=False)
    assert test[0]["video"].shape == (3, FRAMES, SIZE, SIZE)


def test_sixteen_bit_grey_png(tmp_path):
    folder = tmp_path / "deep"
    folder.mkdir()
    grey = (np.arange(SIZE * SIZE, dtype=np.uint16).reshape(SIZE, SIZE) * 200).astype(np.uint16)
    Image.fromarray(grey).save(folder / "0.png")
    video = read_frames(str(folder))
    np.testing.assert_allclose(video[0, ..., 1], grey / 65535.0, atol=1e-6)


def test_streamed_frames_equal_the_whole_video_for_every_format(root):
    for split, name in (("train", "a#v1#c1"), ("train", "a#v2#c1.mp4"), ("train", "b#v1#c1.gif"),
                        ("train", "b#v2#c1.png"), ("test", "t0")):
        path = os.path.join(root, split, name)
        chunks = list(iter_frames(path, 4, frame_shape=(SIZE, SIZE, 3)))
        assert [len(chunk) for chunk in chunks] == [4, 2], name
        assert all(chunk.dtype == np.float32 for chunk in chunks)
        np.testing.assert_array_equal(np.concatenate(chunks), read_frames(path, frame_shape=(SIZE, SIZE, 3)),
                                      err_msg=name)
    dataset = make_dataset(root, is_train=False)
    streamed = torch.cat(list(dataset.iter_video(1, 5)))
    assert streamed.shape == (FRAMES, 3, SIZE, SIZE)
    assert torch.equal(streamed, dataset[1]["video"].permute(1, 0, 2, 3))


def test_streamed_frames_hold_one_chunk_in_memory(tmp_path):
    import tracemalloc

    frames, size = 400, 32
    path = str(tmp_path / "long")
    _write_folder(path, np.repeat(_video(0, frames=1, size=size), frames, axis=0))
    whole = frames * size * size * 3 * 4  # the video as float32: 4.9 MB
    tracemalloc.start()
    try:
        count = sum(len(chunk) for chunk in iter_frames(path, 8))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == frames
    assert peak < whole / 10, (peak, whole)  # about a chunk of 8 frames (twice: list and stack), not the video


def test_streamed_frames_errors_are_one_line(tmp_path):
    folder = tmp_path / "v"
    _write_folder(str(folder), _video(0))
    Image.fromarray(_video(0, frames=1, size=SIZE + 2)[0]).save(folder / "999.png")
    with pytest.raises(DatasetError, match=r"frame 6 is 18x18, frame 0 is 16x16"):
        list(iter_frames(str(folder), 4))
    with pytest.raises(DatasetError, match=r"frame 0 is 16x16, expected 8x8"):
        list(iter_frames(str(folder), 4, frame_shape=(8, 8, 3)))


class _BrokenVideos(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, index):
        raise DatasetError(f"/data/train/{index:05d}.mp4: unreadable or corrupt video (moov atom not found)")


def test_a_dataset_error_in_a_dataloader_worker_stays_one_line():
    """PyTorch re-raises a worker's exception with the worker's traceback as its message (27 lines);
    DatasetError keeps the original line."""
    loader = torch.utils.data.DataLoader(_BrokenVideos(), batch_size=2, num_workers=1)
    with pytest.raises(DatasetError) as error:
        next(iter(loader))
    assert str(error.value) == "/data/train/00000.mp4: unreadable or corrupt video (moov atom not found)"
    assert str(DatasetError("a: b")) == "a: b"
