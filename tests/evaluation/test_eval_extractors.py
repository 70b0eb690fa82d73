"""The extractors' pre- and post-processing against hand computations and against the upstream
algorithms transcribed here; each random-weight extractor runs on CPU in about a second."""
import numpy as np
import pytest
import torch

from evaluation.extractors import (
    BodyIdentityExtractor,
    BodyKeypointExtractor,
    FaceIdentityExtractor,
    FaceLandmarkExtractor,
    body_identity,
    body_keypoints,
    face_identity,
    face_landmarks,
)
from evaluation.extractors.opencv import resize_linear_uint8


def _legacy_lrn(x, size=5, alpha=1e-4, beta=0.75, k=1.0):
    """OpenFacePytorch's SpatialCrossMapLRN_temp.updateOutput, transcribed loop for loop."""
    squares = x ** 2
    channels = x.shape[1]
    scale = torch.zeros_like(x)
    pre_pad = int((size - 1) / 2 + 1)
    for c in range(min(pre_pad, channels)):
        scale[:, 0] += squares[:, c]
    for c in range(1, channels):
        scale[:, c] = scale[:, c - 1]
        if c < channels - pre_pad + 1:
            scale[:, c] += squares[:, c + pre_pad - 1]
        if c > pre_pad:
            scale[:, c] -= squares[:, c - pre_pad]
    scale = scale * (alpha / size) + k
    return scale.pow(-beta) * x


def test_cross_map_lrn_reproduces_the_ports_window_including_its_channel_0_quirk():
    x = torch.randn(2, 9, 3, 4, dtype=torch.float64) * 30
    ours = face_identity.CrossMapLRN()(x)
    assert torch.allclose(ours, _legacy_lrn(x), rtol=0, atol=1e-12)
    # The quirk: channel 5's window is channels 3..7 plus channel 0; a textbook LRN would not see channel 0.
    y = x.clone()
    y[:, 0] = 0
    assert not torch.allclose(face_identity.CrossMapLRN()(y)[:, 5], ours[:, 5])


def test_heatmap_peaks_quarter_pixel_shift_and_frame_coordinates():
    heatmaps = torch.zeros(1, 2, 64, 64)
    heatmaps[0, 0, 20, 10] = 1.0
    heatmaps[0, 0, 20, 11] = 0.5  # right neighbour larger than the left one: +0.25 in x; y neighbours equal
    heatmaps[0, 1, 5, 0] = 1.0    # on the border: no shift
    peaks = face_landmarks.heatmap_peaks(heatmaps)
    assert peaks[0, 0].tolist() == [10.75, 20.5]   # 1-based (11, 21) + (0.25, 0) - 0.5
    assert peaks[0, 1].tolist() == [0.5, 5.5]
    centre = torch.tensor([100.0, 100.0])
    # scale 1: the crop is 200 px, 64 heatmap px -> x 200 / 64 = 3.125, offset 100 - 100 = 0; truncated.
    points = face_landmarks.transform_points(peaks[0], centre, 1.0, 64, invert=True)
    assert points.tolist() == [[33, 64], [1, 17]]   # 10.75 * 3.125 = 33.6, 20.5 * 3.125 = 64.06, 1.56, 17.19


def test_crop_geometry_of_a_box():
    centre, scale = face_landmarks.crop_geometry(np.array([10.0, 20.0, 110.0, 140.0]))
    assert centre.tolist() == pytest.approx([60.0, 80.0 - 0.12 * 120])
    assert scale == pytest.approx(220.0 / 195.0)


def test_detections_decode_and_nms_by_hand():
    outputs = []
    for level in range(6):
        size = max(1, 16 >> level)
        cls = torch.zeros(1, 2, size, size)
        cls[:, 0] = 5.0  # background everywhere (p(face) = 0.0067 < 0.05)
        outputs += [cls, torch.zeros(1, 4, size, size)]
    outputs[0][0, :, 2, 3] = torch.tensor([0.0, 5.0])  # level 0 (stride 4), row 2, column 3
    boxes = face_landmarks.decode_detections(outputs, 0)
    # prior centre (4 / 2 + 3 * 4, 4 / 2 + 2 * 4) = (14, 10), size 4 * 4 = 16, zero offsets
    assert boxes.shape == (1, 5)
    assert boxes[0, :4].tolist() == [6.0, 2.0, 22.0, 18.0] and boxes[0, 4] == pytest.approx(1 / (1 + np.exp(-5)))
    candidates = np.array([[0, 0, 10, 10, 0.9], [1, 1, 11, 11, 0.8], [50, 50, 60, 60, 0.7], [80, 80, 90, 90, 0.4]])
    # B overlaps A by 100 / (121 + 121 - 100) = 0.70 > 0.3 (areas with +1): suppressed.
    assert face_landmarks.nms(candidates, 0.3) == [0, 2, 3]
    assert face_landmarks.first_face(candidates).tolist() == [0, 0, 10, 10]
    assert face_landmarks.first_face(candidates[3:]) is None  # score 0.4 <= 0.5


def test_opencv_bilinear_matches_hand_values():
    image = torch.tensor([[0, 100], [200, 255]], dtype=torch.uint8)[None, :, :, None]
    assert torch.equal(resize_linear_uint8(image, 2, 2), image)
    # Width 2 -> 4 samples x = -0.25 (clamped to 0), 0.25, 0.75, 1.25 (clamped to 1): 0, 25, 75, 100.
    assert resize_linear_uint8(image[:, :1], 1, 4)[0, 0, :, 0].tolist() == [0, 25, 75, 100]
    # Height 2 -> 1 samples y = 0.5: (0 + 200) / 2 = 100, (100 + 255) / 2 = 177.5 -> 178 (as cv2 5.0 gives).
    assert resize_linear_uint8(image, 1, 2)[0, 0, :, 0].tolist() == [100, 178]


def test_rtpose_peaks_last_in_row_major_order_refined_in_a_5x5_window():
    heatmaps = torch.zeros(1, 3, 12, 12, dtype=torch.float64)
    heatmaps[0, 0, 2, 2] = 0.5    # a peak (earlier in row-major order)
    heatmaps[0, 0, 9, 8] = 0.4    # the last peak: kept
    heatmaps[0, 0, 8, 10] = 0.45  # in its 5x5 window (dx = +2, dy = -1): the refined position
    heatmaps[0, 1, 5, 5] = 0.09   # below thre1 = 0.1: not found
    heatmaps[0, 2, 0, 0] = 0.3    # at the corner: the window is clipped
    keypoints, found = body_keypoints.select_peaks(heatmaps)
    assert found[0].tolist() == [True, False, True]
    assert keypoints[0, 0].tolist() == [10, 8] and keypoints[0, 2].tolist() == [0, 0]


def test_flip_average_swaps_left_and_right_channels():
    heatmaps = torch.zeros(1, 19, 4, 6, dtype=torch.float64)
    flipped = torch.zeros_like(heatmaps)
    flipped[0, 2, 1, 1] = 1.0  # right shoulder in the mirror image, x = 1
    average = body_keypoints.average_with_flip(heatmaps, flipped)
    assert average[0, 5, 1, 4] == 0.5  # left shoulder, x = 6 - 1 - 1
    assert average.sum() == 0.5


def test_rtpose_input_is_bgr_resized_to_368_padded_to_8():
    frames = np.zeros((1, 100, 150, 3), dtype=np.uint8)
    frames[..., 2] = 255  # blue
    inputs, resized = body_keypoints.network_input(frames)
    assert resized == (368, 552) and tuple(inputs.shape) == (1, 3, 368, 552)
    assert inputs[0, 0].min() == inputs[0, 0].max() == pytest.approx(255 / 256 - 0.5)  # channel 0 = B
    assert inputs[0, 2].max() == -0.5


def test_openface_input_is_bgr_unit_range_96():
    frames = np.zeros((1, 40, 40, 3), dtype=np.uint8)
    frames[..., 0] = 255  # red
    inputs = face_identity.openface_input(frames)
    assert tuple(inputs.shape) == (1, 3, 96, 96)
    assert inputs[0, 2].min() == pytest.approx(1.0) and inputs[0, :2].abs().max() == 0.0


def test_reid_input_divides_by_255_twice():
    frames = np.full((1, 32, 16, 3), 255, dtype=np.uint8)
    inputs = body_identity.reid_input(frames)
    assert tuple(inputs.shape) == (1, 3, 288, 144)
    expected = (1 / 255 - np.array(body_identity.IMAGENET_MEAN)) / np.array(body_identity.IMAGENET_STD)
    assert inputs[0, :, 0, 0].tolist() == pytest.approx(expected.tolist(), abs=1e-6)


def test_reid_frame_statistics_equal_training_mode_batchnorm_on_each_frame():
    ours = body_identity.FtNet("frame").double().eval()
    upstream = body_identity.FtNet("running").double()
    upstream.load_state_dict(ours.state_dict())
    upstream.train()  # pose-evaluation never calls eval(): BatchNorm uses each (single) frame's statistics
    x = torch.rand(3, 3, 64, 32, dtype=torch.float64)
    with torch.no_grad():
        expected = torch.cat([upstream(x[i:i + 1]) for i in range(3)])
        assert torch.allclose(ours(x), expected, atol=1e-10)


def test_random_weight_extractors_run_on_cpu():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (2, 48, 48, 3), dtype=np.uint8)
    embeddings = FaceIdentityExtractor()(frames)
    assert embeddings.shape == (2, 128) and np.allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    keypoints, found = BodyKeypointExtractor(input_size=32)(frames)
    assert keypoints.shape == (2, 18, 2) and found.dtype == bool
    assert np.all(keypoints == np.round(keypoints)) and keypoints.min() >= 0 and keypoints.max() < 48
    reid = BodyIdentityExtractor(batch_size=1)
    single = reid(frames)
    reid.batch_size = 2
    assert single.shape == (2, 2048) and np.allclose(reid(frames), single, atol=1e-4)
    landmarks = FaceLandmarkExtractor(fan_modules=1)
    keypoints, found = landmarks(frames[:1])
    assert keypoints.shape == (1, 68, 2) and found.all() in (True, False) and found.any() == found.all()
    assert np.all(keypoints == np.round(keypoints))
    assert landmarks.describe()["weights"] == {"fan": {"path": None, "random": True},
                                               "s3fd": {"path": None, "random": True}}


def test_face_landmarks_of_a_detected_face_lie_in_its_crop(monkeypatch):
    box = np.array([10.0, 12.0, 40.0, 44.0])
    monkeypatch.setattr(face_landmarks, "first_face", lambda candidates: box)
    frames = np.random.default_rng(1).integers(0, 256, (1, 48, 48, 3), dtype=np.uint8)
    keypoints, found = FaceLandmarkExtractor(fan_modules=1)(frames)
    assert found.all()
    centre, scale = face_landmarks.crop_geometry(box)
    half = 100.0 * scale  # the crop is 200 * scale pixels wide around the centre
    assert np.all(np.abs(keypoints - centre.numpy()) <= half + 1)


@pytest.mark.gpu
def test_extractors_give_the_same_results_on_cuda():
    frames = np.random.default_rng(2).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    for build in (lambda device: FaceIdentityExtractor(device=device),
                  lambda device: BodyIdentityExtractor(device=device)):
        torch.manual_seed(0)
        cpu = build("cpu")
        cuda = build("cuda")
        cuda.network.load_state_dict(cpu.network.state_dict())
        assert np.allclose(cpu(frames), cuda(frames), atol=1e-4)
    torch.manual_seed(0)
    cpu = BodyKeypointExtractor(device="cpu", input_size=64)
    cuda = BodyKeypointExtractor(device="cuda", input_size=64)
    cuda.network.load_state_dict(cpu.network.state_dict())
    with torch.inference_mode():
        assert torch.allclose(cpu.heatmaps(frames), cuda.heatmaps(frames).cpu(), atol=1e-4)
