"""The one animation path: source + keypoints (+ background) -> dense motion -> generator -> prediction.

Training (``full_model.GeneratorFullModel``), reconstruction (``reconstruction.py``), the demo
(``demo.py``) and the benchmark (``bench/speed.py``) all animate through :func:`animate`; the three
inference callers go through :class:`Animator`, which detects the keypoints, transfers the motion
(modes standard, relative, avd as in FOMM/TPSMM) and decides on the background motion.

Conventions: images (B, 3, H, W) float in [0, 1]; keypoints {'fg_kp': (B, 5K, 2)}, (x, y) in [-1, 1]
(``grid_sample``, ``align_corners=True``); ``bg_param`` (B, 3, 3) maps driving to source coordinates.

The background motion (BG predictor), as the official code uses it:
- training: from ``train_params.bg_start`` on (before it the background warp is the identity);
- reconstruction (source and driving frames of one video): whenever the model has a BG predictor
  (the official ``reconstruction.py``);
- demo (a source image and another video): never, ``bg_param=None`` even when the checkpoint has a
  BG predictor (the official and TPSMM ``demo.py``): the affine between two unrelated backgrounds is
  not the driving video's motion.
"""
import math

import numpy as np
import torch

MODES = ("relative", "standard", "avd")


class AnimationError(ValueError):
    """Keypoints the relative motion transfer cannot use (one line)."""


def animate(networks, source, kp_source, kp_driving, bg_param=None, dropout_flag=False, dropout_p=0.0):
    """Dense motion from the keypoints (and background affine), then the generator.

    networks: {'dense_motion_network', 'inpainting_network', ...} (``modules.build_networks``).
    Returns the dense-motion outputs updated with the generator's: 'prediction' (B, 3, H, W) in
    [0, 1], 'deformed', 'occlusion_map', 'deformation', 'contribution_maps', 'deformed_source',
    'transformations', 'warped_encoder_maps'. ``dropout_flag`` / ``dropout_p``: the dropout softmax of
    the contribution maps (training only).
    """
    dense_motion = networks["dense_motion_network"](source_image=source, kp_driving=kp_driving,
                                                    kp_source=kp_source, bg_param=bg_param,
                                                    dropout_flag=dropout_flag, dropout_p=dropout_p)
    generated = dict(dense_motion)
    generated.update(networks["inpainting_network"](source, dense_motion))
    return generated


def to_uint8(images):
    """(B, 3, H, W) float in [0, 1] -> (B, H, W, 3) uint8 numpy array (rounded, clipped), converted on the
    images' device so that one uint8 copy reaches the host (the demo's and the reconstruction's outputs)."""
    return (images.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def convex_hull_area(points):
    """Area of the convex hull of 2-D points (N, 2) (Andrew's monotone chain + shoelace); 0 if degenerate.

    Equals ``scipy.spatial.ConvexHull(points).volume`` (what the official code uses) for non-degenerate sets.
    """
    pts = sorted(set(map(tuple, np.asarray(points, dtype=np.float64).reshape(-1, 2).tolist())))
    if len(pts) < 3:
        return 0.0

    def cross(o, a, b):
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    def half(sequence):
        chain = []
        for point in sequence:
            while len(chain) >= 2 and cross(chain[-2], chain[-1], point) <= 0:
                chain.pop()
            chain.append(point)
        return chain[:-1]

    hull = np.array(half(pts) + half(pts[::-1]))
    if len(hull) < 3:
        return 0.0
    x, y = hull[:, 0], hull[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def movement_scale(kp_source, kp_driving_initial):
    """sqrt(hull area of the source kps) / sqrt(hull area of the reference driving kps), both (B, N, 2).

    Faithful to the official code: only batch element 0 of each is used.
    """
    source_area = convex_hull_area(kp_source[0].detach().float().cpu().numpy())
    driving_area = convex_hull_area(kp_driving_initial[0].detach().float().cpu().numpy())
    if driving_area <= 0.0:
        raise AnimationError("the keypoints of the reference driving frame are collinear; use --mode standard")
    return math.sqrt(source_area) / math.sqrt(driving_area)


def relative_keypoints(kp_source, kp_driving, kp_driving_initial, scale):
    """Relative motion transfer: ``kp_source + scale * (kp_driving - kp_driving_initial)``.

    kp_source (1|B, N, 2), kp_driving (B, N, 2), kp_driving_initial (1, N, 2), (x, y) in [-1, 1];
    ``scale`` from :func:`movement_scale`. Returns (B, N, 2).
    """
    return (kp_driving - kp_driving_initial) * scale + kp_source


class Animator:
    """Animates one source image with batches of driving frames (call under ``torch.inference_mode``).

    networks: kp_detector, dense_motion_network, inpainting_network (+ avd_network for mode avd,
    + bg_predictor for ``background``). source: (1, 3, H, W). mode: standard (the driving keypoints as
    they are), relative (the driving motion relative to a reference frame, by default the first one,
    scaled to the source) or avd (through the AVD network). background: use the BG predictor's affine
    for the background warp (reconstruction; see the module docstring), else the identity (demo).
    """

    def __init__(self, networks, source, mode, background):
        if mode not in MODES:
            raise ValueError(f"animation mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.networks = networks
        self.source = source
        self.mode = mode
        self.bg_predictor = networks.get("bg_predictor") if background else None
        self.kp_source = networks["kp_detector"](source)["fg_kp"]
        self.kp_initial = None
        self.scale = None

    def set_reference_frame(self, frame):
        """Relative mode: keypoints of the reference driving frame (1, 3, H, W) and the movement scale."""
        self.kp_initial = self.networks["kp_detector"](frame)["fg_kp"]
        self.scale = movement_scale(self.kp_source, self.kp_initial)

    def __call__(self, driving):
        """(B, 3, H, W) driving frames -> (B, 3, H, W) predictions in [0, 1]."""
        batch = driving.shape[0]
        kp_driving = self.networks["kp_detector"](driving)["fg_kp"]
        kp_source = self.kp_source.expand(batch, -1, -1)
        if self.mode == "relative":
            if self.kp_initial is None:
                self.set_reference_frame(driving[:1])
            kp_driving = relative_keypoints(kp_source, kp_driving, self.kp_initial, self.scale)
        elif self.mode == "avd":
            kp_driving = self.networks["avd_network"]({"fg_kp": kp_source}, {"fg_kp": kp_driving})["fg_kp"]
        source = self.source.expand(batch, -1, -1, -1)
        bg_param = None if self.bg_predictor is None else self.bg_predictor(source, driving)
        generated = animate(self.networks, source, {"fg_kp": kp_source}, {"fg_kp": kp_driving}, bg_param=bg_param)
        return generated["prediction"]
