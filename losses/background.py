"""Background cycle loss (TPSMM/CPABMM): the affine S->D and D->S background motions should compose
to the identity. bg_param, bg_param_reverse: (B, 3, 3) matrices from ``BGMotionPredictor(source,
driving)`` and ``BGMotionPredictor(driving, source)``; loss = mean |A(S,D) @ A(D,S) - I|.
"""
import torch


def background_loss(bg_param, bg_param_reverse):
    """mean over the batch and the 9 entries of |bg_param @ bg_param_reverse - I|."""
    product = torch.matmul(bg_param, bg_param_reverse)
    eye = torch.eye(3, dtype=product.dtype, device=product.device)
    return (product - eye).abs().mean()
