"""Tessellation, constraints and basis of `cpab`: the dimension table, orthonormality, continuity."""
import numpy as np
import pytest
import torch

from cpab import CPAB
from cpab.basis import cell_vertices, constraint_matrix, null_space_basis
from cpab.integrate import cell_index, velocity

# DESIGN.md section 2: d for (valid-outside, + volume-preserving, zero-boundary, zero-boundary + VP).
D_TABLE = {3: (34, 11, 34, 8), 4: (58, 15, 62, 15), 5: (90, 19, 98, 24), 6: (130, 27, 142, 35),
           8: (234, 47, 254, 63)}
VARIANTS = ((False, False), (False, True), (True, False), (True, True))


@pytest.mark.parametrize("n", sorted(D_TABLE))
@pytest.mark.parametrize("variant", range(4))
def test_dimension_table(n, variant):
    zero_boundary, volume_preservation = VARIANTS[variant]
    assert null_space_basis(n, n, zero_boundary, volume_preservation).shape[1] == D_TABLE[n][variant]


def test_cpab_dim_matches_design():
    assert CPAB((4, 4)).dim == 58 and CPAB((6, 6)).dim == 130
    assert CPAB((4, 4), volume_preservation=True).dim == 15
    assert CPAB((6, 6), zero_boundary=True).dim == 142


@pytest.mark.parametrize("variant", range(4))
def test_basis_orthonormal_and_in_null_space(variant):
    zero_boundary, volume_preservation = VARIANTS[variant]
    for nx, ny in ((3, 3), (4, 2)):
        basis = null_space_basis(nx, ny, zero_boundary, volume_preservation)
        L = constraint_matrix(nx, ny, zero_boundary, volume_preservation)
        assert basis.dtype == np.float64
        np.testing.assert_allclose(basis.T @ basis, np.eye(basis.shape[1]), atol=1e-12)
        assert np.abs(L @ basis).max() < 1e-9
        # The basis spans the whole null space (same dimension as a direct SVD of L).
        s = torch.linalg.svdvals(torch.from_numpy(L))  # (torch: numpy's threaded LAPACK crawls on busy CPUs)
        assert basis.shape[1] == L.shape[1] - int((s > 1e-9 * s[0]).sum())


def test_basis_cached_and_read_only():
    a = null_space_basis(4, 4)
    assert a is null_space_basis(4, 4)
    with pytest.raises(ValueError):
        a[0, 0] = 1.0


def test_cell_numbering_matches_vertices():
    nx, ny = 3, 2
    verts = cell_vertices(nx, ny)  # on [0, 1]^2
    centroids = torch.from_numpy(verts.mean(axis=1)) * 2 - 1  # to [-1, 1]^2
    assert torch.equal(cell_index(centroids, nx, ny), torch.arange(4 * nx * ny))
    # Explicit examples: cell c = 4 * (j * nx + i) + t, t = lower / right / upper / left.
    points = torch.tensor([[-0.66, -0.9], [0.9, 0.5], [0.0, 0.95], [-0.95, 0.5]], dtype=torch.float64)
    assert cell_index(points, nx, ny).tolist() == [4 * 0 + 0, 4 * (3 + 2) + 1, 4 * (3 + 1) + 2, 4 * 3 + 3]
    # Outside the domain: the boundary triangle facing the point; beyond a corner, the extended diagonal.
    outside = torch.tensor([[-5.0, -0.5], [5.0, 0.5], [0.0, -7.0], [-3.0, -2.0], [-2.0, -3.0]], dtype=torch.float64)
    assert cell_index(outside, nx, ny).tolist() == [3, 4 * 5 + 1, 4 * 1 + 0, 3, 0]


def _edge_points(nx, ny, lo, hi, per_line=50):
    """Points on every tessellation line (square sides, diagonals and their extensions) with unit normals."""
    s = torch.linspace(lo, hi, per_line, dtype=torch.float64)
    pts, normals = [], []
    for xv in torch.linspace(-1, 1, nx + 1, dtype=torch.float64):
        pts.append(torch.stack([torch.full_like(s, xv), s], 1)); normals.append(torch.tensor([1.0, 0.0]).expand(per_line, 2))
    for yv in torch.linspace(-1, 1, ny + 1, dtype=torch.float64):
        pts.append(torch.stack([s, torch.full_like(s, yv)], 1)); normals.append(torch.tensor([0.0, 1.0]).expand(per_line, 2))
    hx, hy = 2.0 / nx, 2.0 / ny
    for i in range(nx):
        for j in range(ny):
            cx, cy = -1 + (i + 0.5) * hx, -1 + (j + 0.5) * hy
            for sign in (1.0, -1.0):
                direction = torch.tensor([hx, sign * hy], dtype=torch.float64) / np.hypot(hx, hy)
                u = s.unsqueeze(1) * 1.5
                pts.append(torch.tensor([cx, cy]) + u * direction)
                normals.append(torch.tensor([-direction[1], direction[0]]).expand(per_line, 2))
    return torch.cat(pts).unsqueeze(0), torch.cat(normals).to(torch.float64).unsqueeze(0)


@pytest.mark.parametrize("variant", range(4))
def test_velocity_continuous_across_every_edge(variant):
    zero_boundary, volume_preservation = VARIANTS[variant]
    model = CPAB((4, 3), zero_boundary=zero_boundary, volume_preservation=volume_preservation).double()
    theta = torch.randn(1, model.dim, dtype=torch.float64)
    A = model.cell_affines(theta)
    # Valid-outside fields are continuous on the whole plane; zero-boundary ones inside the domain.
    lo, hi = (-1.0, 1.0) if zero_boundary else (-3.0, 3.0)
    points, normals = _edge_points(4, 3, lo, hi)
    if zero_boundary:
        keep = (points.abs() <= 1 - 1e-6).all(-1)
        points, normals = points[keep].unsqueeze(0), normals[keep].unsqueeze(0)
    eps = 1e-9
    plus, minus = points + eps * normals, points - eps * normals
    assert (cell_index(plus, 4, 3) != cell_index(minus, 4, 3)).float().mean() > 0.2  # many really cross cells
    jump = (velocity(plus, A, 4, 3) - velocity(minus, A, 4, 3)).abs().max()
    assert jump < 1e-6


def test_valid_outside_field_is_affine_along_each_side():
    # Outside the left side the field of each boundary triangle is extended; neighbours agree on the
    # horizontal lines through their shared vertex (libcpab's valid-outside constraints).
    model = CPAB((4, 4)).double()
    A = model.cell_affines(torch.randn(1, model.dim, dtype=torch.float64))
    y = torch.tensor(-0.5, dtype=torch.float64)
    x = torch.linspace(-10, -1, 20, dtype=torch.float64)
    above = torch.stack([x, torch.full_like(x, y + 1e-9)], 1).unsqueeze(0)
    below = torch.stack([x, torch.full_like(x, y - 1e-9)], 1).unsqueeze(0)
    assert (cell_index(above, 4, 4) != cell_index(below, 4, 4)).all()
    assert (velocity(above, A, 4, 4) - velocity(below, A, 4, 4)).abs().max() < 1e-6


def test_zero_boundary_normal_velocity_vanishes_on_border():
    model = CPAB((4, 4), zero_boundary=True).double()
    A = model.cell_affines(3 * torch.randn(2, model.dim, dtype=torch.float64))
    s = torch.linspace(-1, 1, 101, dtype=torch.float64)
    one = torch.ones_like(s)
    for points, component in ((torch.stack([-one, s], 1), 0), (torch.stack([one, s], 1), 0),
                              (torch.stack([s, -one], 1), 1), (torch.stack([s, one], 1), 1)):
        v = velocity(points.unsqueeze(0).expand(2, -1, -1), A, 4, 4)
        assert v[..., component].abs().max() < 1e-12
        assert v[..., 1 - component].abs().max() > 1e-3  # tangential motion is allowed
    corners = torch.tensor([[[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]]], dtype=torch.float64)
    assert velocity(corners.expand(2, -1, -1), A, 4, 4).abs().max() < 1e-12


def test_volume_preservation_zero_trace():
    model = CPAB((4, 4), volume_preservation=True).double()
    A = model.cell_affines(torch.randn(3, model.dim, dtype=torch.float64))
    assert (A[..., 0, 0] + A[..., 1, 1]).abs().max() < 1e-12


def test_basis_converted_to_pm1_domain():
    # theta keeps libcpab's [0, 1] meaning: v_pm1(x) = 2 v_01((x + 1) / 2).
    model = CPAB((3, 3)).double()
    theta = torch.randn(1, model.dim, dtype=torch.float64)
    A01 = (theta @ model.basis01.T).view(1, -1, 2, 3)
    x = torch.rand(1, 40, 2, dtype=torch.float64) * 2 - 1
    u = (x + 1) / 2
    assert torch.allclose(model.velocity(x, theta), 2 * velocity(u * 2 - 1, A01.new_zeros(A01.shape), 3, 3)
                          + 2 * torch.einsum("bnij,bnj->bni", A01[0, cell_index(x, 3, 3)[0]].unsqueeze(0),
                                             torch.cat([u, torch.ones_like(u[..., :1])], -1)), atol=1e-12)
