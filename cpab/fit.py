"""Keypoint fits of CPAB parameters (placeholder, filled below)."""


def fit_adam(model, x, y, iterations, lr, theta_init):
    raise NotImplementedError


def fit_gauss_newton(model, x, y, iterations, damping):
    raise NotImplementedError
