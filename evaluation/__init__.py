"""Protocol metrics of video reconstruction (L1, AKD, MKR, AED) as pose-evaluation defines them.

``evaluate.py`` scores any method's result folders; ``reconstruction.py`` calls
:func:`evaluate_reconstruction` on the lossless strips it writes. The extractors rebuild the
published networks (face-alignment's FAN-4 + S3FD, OpenFace, rtpose VGG19, the re-ID ft_net) so that
their authors' weight files load strictly; nothing is downloaded (evaluation/weights.py).
"""
from evaluation.core import (
                             DOMAINS,
                             Evaluator,
                             check_eval_config,
                             check_metrics,
                             evaluate_folders,
                             evaluate_reconstruction,
                             parse_metrics,
                             resolve_weights,
                             summary_line,
)
from evaluation.metrics import DEFINITIONS, METRICS, aed_frames, akd_frames, l1_frames, mkr_frames, summarise

__all__ = ["DEFINITIONS", "DOMAINS", "Evaluator", "METRICS", "aed_frames", "akd_frames", "check_eval_config",
           "check_metrics", "evaluate_folders", "evaluate_reconstruction", "l1_frames", "mkr_frames",
           "parse_metrics", "resolve_weights", "summarise", "summary_line"]
