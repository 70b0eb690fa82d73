"""Tessellation, constraints and bases of `cpab`: the dimension table, orthonormality, continuity, the
shipped libcpab bases. (Against libcpab itself: tests/cpab/test_libcpab.py.)"""
import subprocess
import sys

import numpy as np
import pytest
import torch

from cpab import CPAB
from cpab.basis import (
    BASES,
    SHIPPED,
    cell_vertices,
    constraint_matrix,
    libcpab_constraint_matrix,
    libcpab_svd_basis,
    null_space_basis,
    shipped_basis_name,
)
from cpab.integrate import cell_index, velocity
from cpab.make_bases import BASES_DIR

# libcpab's dimensions d for (valid-outside, + volume-preserving, zero-boundary, zero-boundary + VP).
D_TABLE = {3: (34, 11, 34, 8), 4: (58, 15, 62, 15), 5: (90, 19, 98, 24), 6: (130, 27, 142, 35),
           8: (234, 47, 254, 63)}
VARIANTS = ((False, False), (False, True), (True, False), (True, True))


@pytest.mark.parametrize("basis", BASES)
@pytest.mark.parametrize("n", sorted(D_TABLE))
@pytest.mark.parametrize("variant", range(4))
def test_dimension_table(n, variant, basis):
    zero_boundary, volume_preservation = VARIANTS[variant]
    assert null_space_basis(n, n, zero_boundary, volume_preservation, basis=basis).shape[1] == D_TABLE[n][variant]


def test_cpab_dim_matches_design():
    assert CPAB((4, 4)).dim == 58 and CPAB((6, 6)).dim == 130
    assert CPAB((4, 4), volume_preservation=True).dim == 15
    assert CPAB((6, 6), zero_boundary=True).dim == 142
    assert CPAB((6, 6), basis="vertex").dim == 130


@pytest.mark.parametrize("basis", BASES)
@pytest.mark.parametrize("variant", range(4))
def test_basis_orthonormal_and_in_null_space(variant, basis):
    zero_boundary, volume_preservation = VARIANTS[variant]
    for nx, ny in ((3, 3), (4, 2), (4, 4)):
        B = null_space_basis(nx, ny, zero_boundary, volume_preservation, basis=basis)
        assert B.dtype == np.float64
        np.testing.assert_allclose(B.T @ B, np.eye(B.shape[1]), atol=1e-12)
        # Both constraint matrices (this project's compact one and libcpab's) have the same null space.
        for L in (constraint_matrix(nx, ny, zero_boundary, volume_preservation),
                  libcpab_constraint_matrix(nx, ny, zero_boundary, volume_preservation)):
            assert np.abs(L @ B).max() < 1e-9
            # The basis spans the whole null space (same dimension as a direct SVD of L).
            s = torch.linalg.svdvals(torch.from_numpy(L))  # (torch: numpy's threaded LAPACK crawls on busy CPUs)
            assert B.shape[1] == L.shape[1] - int((s > 1e-9 * s[0]).sum())


def test_the_two_bases_span_one_space_and_differ_by_a_rotation():
    # Same fields, different theta: Q = B_libcpab^T B_vertex is orthogonal and far from the identity
    # (Adam, not rotation-invariant, then follows another path: see test_libcpab.py and the README).
    for size in ((4, 4, False, False), (3, 3, True, True)):
        Q = null_space_basis(*size, basis="libcpab").T @ null_space_basis(*size, basis="vertex")
        np.testing.assert_allclose(Q.T @ Q, np.eye(Q.shape[0]), atol=1e-10)
        assert np.abs(Q - np.eye(Q.shape[0])).max() > 0.5
    model, vertex = CPAB((4, 4)).double(), CPAB((4, 4), basis="vertex").double()
    assert model.basis_kind == "libcpab" and vertex.basis_kind == "vertex" and "basis=vertex" in repr(vertex)
    theta = torch.randn(2, model.dim, dtype=torch.float64)
    rotated = theta @ torch.from_numpy(null_space_basis(4, 4).T @ null_space_basis(4, 4, basis="vertex"))
    points = torch.rand(2, 300, 2, dtype=torch.float64) * 2 - 1
    assert torch.allclose(model.velocity(points, theta), vertex.velocity(points, rotated), atol=1e-12)


def test_unknown_basis_is_refused():
    with pytest.raises(ValueError, match="basis must be one of"):
        CPAB((4, 4), basis="orthonormal")
    with pytest.raises(ValueError, match="basis must be one of"):
        null_space_basis(4, 4, basis="svd")


def test_shipped_bases_are_the_default_and_libcpabs_routine():
    # The released configs' tessellations come from cpab/bases/ (package data): float64, read-only, and
    # what libcpab's routine computes from libcpab's L (the same d; the rotation itself depends on the
    # LAPACK build: bit-for-bit checks in test_libcpab.py and test_make_bases_check below).
    assert {(4, 4, False, False), (6, 6, False, False)} <= set(SHIPPED)
    for nx, ny, zb, vp in SHIPPED:
        path = BASES_DIR / shipped_basis_name(nx, ny, zb, vp)
        with np.load(path) as data:
            shipped = data["basis"]
            assert "Haswell" in str(data["provenance"])
        B = null_space_basis(nx, ny, zb, vp)
        assert np.array_equal(B, shipped) and B.dtype == np.float64 and not B.flags.writeable
        assert B.shape == (24 * nx * ny, D_TABLE[nx][2 * zb + vp])
        assert np.abs(libcpab_constraint_matrix(nx, ny, zb, vp) @ B).max() < 1e-12


def test_libcpab_svd_basis_is_the_null_space_of_a_wide_matrix():
    # 1 x 1 valid outside: L has fewer rows (16) than columns (24); the columns beyond the singular
    # values belong to the null space (libcpab's padding).
    L = libcpab_constraint_matrix(1, 1)
    assert L.shape == (16, 24)
    B = libcpab_svd_basis(L)
    assert B.shape == (24, 24 - np.linalg.matrix_rank(L)) and np.abs(L @ B).max() < 1e-12


@pytest.mark.slow
def test_make_bases_check():
    # Regenerates every shipped basis under the reference LAPACK setup and compares (exit 0: identical).
    child = subprocess.run([sys.executable, "-m", "cpab.make_bases", "--check"], capture_output=True, text=True,
                           timeout=600, cwd=BASES_DIR.parent.parent)
    if "did not report" in child.stderr:
        pytest.skip("this machine cannot run OpenBLAS's Haswell kernels (see cpab.make_bases)")
    assert child.returncode == 0, child.stdout + child.stderr
    assert child.stdout.count("max |shipped - computed| = 0.0e+00") == len(SHIPPED)


def test_basis_cached_and_read_only():
    for basis in BASES:
        a = null_space_basis(3, 3, basis=basis)
        assert a is null_space_basis(3, 3, basis=basis)
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
        pts.append(torch.stack([torch.full_like(s, xv), s], 1))
        normals.append(torch.tensor([1.0, 0.0]).expand(per_line, 2))
    for yv in torch.linspace(-1, 1, ny + 1, dtype=torch.float64):
        pts.append(torch.stack([s, torch.full_like(s, yv)], 1))
        normals.append(torch.tensor([0.0, 1.0]).expand(per_line, 2))
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
