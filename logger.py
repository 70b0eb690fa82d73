"""Training logs: TensorBoard scalars and image grids, and the progress bar (rank 0 only).

``RunLog`` writes the running losses, learning rates and seconds per iteration every ``log_freq``
iterations and a ``Visualizer`` grid every ``image_freq`` iterations under ``<run_dir>/tensorboard``.
"""
import os
import time

import numpy as np
import torch.nn.functional as F
from skimage.draw import disk
from tqdm import tqdm

# Colour tables: (position, (r, g, b)) stops of piecewise-linear colour maps, values in [0, 1].
_COLORMAPS = {
    "gist_rainbow": ((0.000, (1.00, 0.00, 0.16)), (0.030, (1.00, 0.00, 0.00)),
                     (0.215, (1.00, 1.00, 0.00)), (0.400, (0.00, 1.00, 0.00)),
                     (0.586, (0.00, 1.00, 1.00)), (0.770, (0.00, 0.00, 1.00)),
                     (0.954, (1.00, 0.00, 1.00)), (1.000, (1.00, 0.00, 0.75))),
    "hsv": ((0.0, (1.0, 0.0, 0.0)), (1 / 6, (1.0, 1.0, 0.0)), (2 / 6, (0.0, 1.0, 0.0)),
            (3 / 6, (0.0, 1.0, 1.0)), (4 / 6, (0.0, 0.0, 1.0)), (5 / 6, (1.0, 0.0, 1.0)),
            (1.0, (1.0, 0.0, 0.0))),
    "gray": ((0.0, (0.0, 0.0, 0.0)), (1.0, (1.0, 1.0, 1.0))),
}


def colormap_rgb(name, value):
    """RGB in [0, 1] (shape (3,)) of the named colour map at ``value`` in [0, 1] (clipped)."""
    if name not in _COLORMAPS:
        raise ValueError(f"visualizer_params.colormap: unknown colour map {name!r}; "
                         f"one of {sorted(_COLORMAPS)}")
    stops = _COLORMAPS[name]
    positions = np.array([position for position, _ in stops])
    colours = np.array([colour for _, colour in stops])
    value = float(np.clip(value, 0.0, 1.0))
    return np.array([np.interp(value, positions, colours[:, channel]) for channel in range(3)])


def _to_hwc(images, size):
    """(B, C, h, w) tensor -> (B, H, W, 3) float numpy in [0, 1], resized to ``size`` = (H, W)."""
    images = images.detach().float().cpu()
    if images.shape[1] == 1:
        images = images.repeat(1, 3, 1, 1)
    if tuple(images.shape[2:]) != tuple(size):
        images = F.interpolate(images, size=size, mode="nearest")
    return np.clip(images.permute(0, 2, 3, 1).numpy(), 0.0, 1.0)


def _keypoints(value):
    """Keypoints (B, N, 2) numpy from a detector output dict {'fg_kp': ...} or a tensor."""
    if isinstance(value, dict):
        value = value["fg_kp"]
    return value.detach().float().cpu().numpy()


class Visualizer:
    """Image grids for TensorBoard: one row per batch item, one column per quantity.

    Columns: source with its keypoints, driving with its keypoints, the source warped by the final
    flow ('deformed'), the prediction, each occlusion mask, then for each of the K+2 warps the
    deformed source and its contribution map (tinted with the warp's colour; the background warp,
    index 0, in gray), and finally the sum of the tinted contribution maps.
    Keypoints are (x, y) in [-1, 1] (``grid_sample``, ``align_corners=True`` convention); each
    keypoint gets the colour of the colour map at index / count.
    """

    def __init__(self, kp_size, draw_border, colormap):
        colormap_rgb(colormap, 0.0)
        self.kp_size = kp_size
        self.draw_border = draw_border
        self.colormap = colormap

    def draw_keypoints(self, image, keypoints):
        """Disks of radius ``kp_size`` at ``keypoints`` (N, 2) in [-1, 1] on a copy of ``image`` (H, W, 3)."""
        image = np.copy(image)
        height, width = image.shape[:2]
        count = keypoints.shape[0]
        for index, (x, y) in enumerate(keypoints):
            column = (x + 1) / 2 * (width - 1)
            row = (y + 1) / 2 * (height - 1)
            rr, cc = disk((row, column), self.kp_size, shape=(height, width))
            image[rr, cc] = colormap_rgb(self.colormap, index / count)
        return image

    def _column(self, images):
        """(B, H, W, 3) -> (B*H, W, 3) column, with a white border line between items if asked."""
        if self.draw_border:
            images = np.copy(images)
            images[:, [0, -1], :] = 1.0
            images[:, :, [0, -1]] = 1.0
        return np.concatenate(list(images), axis=0)

    def visualize(self, source, driving, out, max_items=4):
        """Grid as an (H, W, 3) uint8 array (``SummaryWriter.add_image(..., dataformats='HWC')``).

        source, driving: (B, 3, H, W) in [0, 1]; out: the generated dict of the full model (keys
        kp_source, kp_driving, prediction, and when present deformed, occlusion_map (list),
        deformed_source (B, K+2, 3, h, w), contribution_maps (B, K+2, h, w)).
        """
        count = min(int(source.shape[0]), max_items)
        size = tuple(source.shape[2:])
        source_np = _to_hwc(source[:count], size)
        driving_np = _to_hwc(driving[:count], size)
        columns = []
        for images, key in ((source_np, "kp_source"), (driving_np, "kp_driving")):
            if key in out:
                keypoints = _keypoints(out[key])[:count]
                images = np.stack([self.draw_keypoints(image, kp) for image, kp in zip(images, keypoints, strict=True)])
            columns.append(images)
        if "deformed" in out:
            columns.append(_to_hwc(out["deformed"][:count], size))
        columns.append(_to_hwc(out["prediction"][:count], size))
        for mask in out.get("occlusion_map", None) or []:
            columns.append(_to_hwc(mask[:count], size))
        if "deformed_source" in out and "contribution_maps" in out:
            warps = out["deformed_source"].shape[1]
            tinted_sum = np.zeros_like(source_np)
            for index in range(warps):
                columns.append(_to_hwc(out["deformed_source"][:count, index], size))
                mask = _to_hwc(out["contribution_maps"][:count, index:index + 1], size)
                if index == 0:
                    colour = np.full(3, 0.5)
                else:
                    colour = colormap_rgb(self.colormap, (index - 1) / max(warps - 1, 1))
                tinted = mask * colour.reshape(1, 1, 1, 3)
                columns.append(tinted)
                tinted_sum = tinted_sum + tinted
            columns.append(np.clip(tinted_sum, 0.0, 1.0))
        grid = np.concatenate([self._column(images) for images in columns], axis=1)
        return (np.clip(grid, 0.0, 1.0) * 255).round().astype(np.uint8)


class RunLog:
    """Rank-0 TensorBoard scalars/images and tqdm bar with running losses; silent on other ranks.

    Every point is written at the number of iterations done (a step's scalars and grid at ``step + 1``).
    ``resumed_at``: the iterations the checkpoint of a resumed run holds; points a crashed run wrote
    after it are dropped (TensorBoard's ``purge_step``), so a resumed curve has each step once. The
    event file is created at the first write, so a run that fails before its first point leaves no
    TensorBoard folder.
    """

    def __init__(self, run_dir, dist, total_steps, initial_step, log_freq, image_freq, visualizer_params,
                 resumed_at=None):
        self.enabled = dist.is_main
        self.log_freq = log_freq
        self.image_freq = image_freq
        self.sums = {}
        self.counts = {}
        self.count = 0
        self.window_start = time.perf_counter()
        self.log_dir = os.path.join(run_dir, "tensorboard")
        self.purge_step = None if resumed_at is None else int(resumed_at) + 1
        self._writer = None
        self.bar = None
        self.visualizer = Visualizer(kp_size=visualizer_params["kp_size"],
                                     draw_border=visualizer_params["draw_border"],
                                     colormap=visualizer_params["colormap"])
        if self.enabled:
            self.bar = tqdm(total=total_steps, initial=initial_step, unit="it", dynamic_ncols=True)

    @property
    def writer(self):
        """The SummaryWriter, created at the first write (rank 0 only)."""
        if self._writer is None:
            # Imported here: only rank 0 writes, and tensorboard is slow to import.
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=self.log_dir, purge_step=self.purge_step)
        return self._writer

    def step(self, step, epoch, means, learning_rates):
        """Record the losses of global step ``step`` (0-based, already done); write every log_freq."""
        if not self.enabled:
            return
        for name, value in means.items():
            self.sums[name] = self.sums.get(name, 0.0) + float(value)
            self.counts[name] = self.counts.get(name, 0) + 1
        self.count += 1
        running = {name: total / self.counts[name] for name, total in self.sums.items()}
        self.bar.set_postfix({"epoch": epoch, **{name: f"{value:.4f}" for name, value in running.items()}},
                             refresh=False)
        self.bar.update(1)
        if (step + 1) % self.log_freq == 0:
            seconds = (time.perf_counter() - self.window_start) / self.count
            for name, value in running.items():
                self.writer.add_scalar(f"loss/{name}", value, step + 1)
            self.writer.add_scalar("loss/total", sum(running.values()), step + 1)
            for name, value in learning_rates.items():
                self.writer.add_scalar(f"lr/{name}", value, step + 1)
            self.writer.add_scalar("time/seconds_per_iteration", seconds, step + 1)
            self.sums = {}
            self.counts = {}
            self.count = 0
            self.window_start = time.perf_counter()

    def images(self, step, source, driving, generated, tag="train/grid"):
        """Write a visualisation grid of step ``step`` (0-based) when it is a multiple of image_freq."""
        if self.enabled and step % self.image_freq == 0:
            grid = self.visualizer.visualize(source, driving, generated)
            self.writer.add_image(tag, grid, step + 1, dataformats="HWC")

    def message(self, text):
        if self.enabled:
            self.bar.write(text)

    def close(self):
        if self.enabled:
            self.bar.close()
            if self._writer is not None:
                self._writer.close()
