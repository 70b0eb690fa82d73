"""Metric arithmetic against hand computations (pose-evaluation's cmp.py, cmp_kp.py, cmp_with_missing.py)."""
import math

import numpy as np
import pytest

from evaluation.metrics import aed_frames, akd_frames, l1_frames, mkr_frames, summarise


def test_l1_is_the_mean_absolute_difference_in_unit_range():
    real = np.zeros((2, 2, 2, 3), dtype=np.uint8)
    generated = real.copy()
    generated[0, 0, 0, 0] = 255  # one of 12 values of frame 0 differs by 1.0
    generated[1] = 51            # every value of frame 1 differs by 0.2
    assert l1_frames(real, generated) == pytest.approx([1 / 12, 0.2])
    assert l1_frames(real, real).tolist() == [0.0, 0.0]
    assert l1_frames(real / 255.0, generated / 255.0) == pytest.approx([1 / 12, 0.2])


def test_akd_of_shifted_keypoints_is_the_mean_absolute_coordinate_shift():
    real = np.array([[[10.0, 20.0], [30.0, 40.0]]])
    generated = real + np.array([[[3.0, -1.0], [0.0, 2.0]]])
    found = np.ones((1, 2), dtype=bool)
    # (|3| + |-1| + |0| + |2|) / 4 coordinates = 1.5 pixels (not a Euclidean distance: that would be 2.58).
    assert akd_frames(real, found, generated, found) == pytest.approx([1.5])
    assert akd_frames(real, found, real, found).tolist() == [0.0]


def test_akd_and_mkr_with_missing_keypoints():
    real = np.zeros((3, 4, 2))
    generated = np.full((3, 4, 2), 2.0)
    generated[0, 1] = [6.0, 0.0]
    real_found = np.array([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=bool)
    generated_found = np.array([[1, 1, 0, 1], [0, 0, 1, 1], [1, 1, 1, 1]], dtype=bool)
    akd = akd_frames(real, real_found, generated, generated_found)
    # Frame 0: keypoints 0 and 1 found in both: (2 + 2 + 6 + 0) / 4 = 2.5; frame 1: none in both; frame 2: none.
    assert akd[0] == pytest.approx(2.5) and math.isnan(akd[1]) and math.isnan(akd[2])
    mkr = mkr_frames(real_found, generated_found)
    # Frame 0: 1 of 3 real keypoints missing; frame 1: 1 of 1; frame 2: no real keypoint -> not scored.
    assert mkr[0] == pytest.approx(1 / 3) and mkr[1] == 1.0 and math.isnan(mkr[2])
    assert mkr_frames(real_found, real_found)[:2].tolist() == [0.0, 0.0]


def test_face_akd_skips_frames_without_a_face_like_cmp_kp():
    real = np.zeros((2, 68, 2))
    generated = np.ones((2, 68, 2))
    found = np.ones((2, 68), dtype=bool)
    no_face = found.copy()
    no_face[1] = False
    akd = akd_frames(real, found, generated, no_face)
    assert akd[0] == 1.0 and math.isnan(akd[1])


def test_aed_is_the_squared_l2_distance():
    real = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    generated = np.array([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
    # Frame 0: (1 - 0)^2 + (0 - 1)^2 = 2 (the L2 distance would be 1.414); frame 1: identical.
    assert aed_frames(real, generated).tolist() == [2.0, 0.0]
    assert aed_frames(np.array([[3.0, 4.0]]), np.zeros((1, 2))).tolist() == [25.0]


def test_summary_pools_scored_frames_of_all_videos():
    summary = summarise({"a": [1.0, 3.0, float("nan")], "b": [8.0]}, "definition")
    # Pooled over frames: (1 + 3 + 8) / 3 = 4, not the mean of the video means ((2 + 8) / 2 = 5).
    assert summary["mean"] == pytest.approx(4.0) and summary["frames"] == 3 and summary["skipped_frames"] == 1
    assert summary["per_video"]["a"] == {"mean": 2.0, "frames": 2, "skipped_frames": 1}
    assert summary["definition"] == "definition"
    empty = summarise({"a": [float("nan")]})
    assert empty["mean"] is None and empty["per_video"]["a"]["mean"] is None
