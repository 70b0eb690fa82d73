"""Tessellation and constraint null-space basis of 2-D CPA velocity fields.

Tessellation (libcpab's): the domain is split into nx x ny equal rectangles ("squares"), each
split by its two diagonals into 4 triangles, so there are nC = 4 * nx * ny cells. Cell numbering:

    c = 4 * (j * nx + i) + t

with i in [0, nx) the column (x index), j in [0, ny) the row (y index) and t the triangle of the
square that touches its edge at lower y (t = 0), right x (t = 1), upper y (t = 2), left x (t = 3).

Parameters: every cell holds a 2 x 3 affine matrix [[a11, a12, b1], [a21, a22, b2]] (stored
row-major as 6 numbers), the velocity in that cell is v(p) = A[:, :2] p + A[:, 2]. The constraint
matrix L (rows x 6 nC) collects linear constraints on the stacked parameters; the basis is an
orthonormal basis (float64, via SVD) of its null space, so A = reshape(basis @ theta).

Constraint sets:
- continuity (always): two triangles that share an edge agree at both edge end-points;
- valid outside (zero_boundary=False, libcpab's default and what CPABMM uses): for every pair of
  boundary triangles lying along the same side of the domain in neighbouring squares, the two
  affine maps also agree at a point on the line through their shared vertex perpendicular to that
  side, hence on the whole line; the field then extends continuously outside the domain;
- zero boundary (zero_boundary=True): the normal velocity component is 0 at every cell vertex on the
  domain border (v_x = 0 on the left/right sides, v_y = 0 on the bottom/top sides; both at corners),
  so the field is tangent to the border and the square is mapped onto itself. This is one
  constraint per border vertex, like libcpab (which constrains the tangential component instead;
  same dimension d, but libcpab's choice lets points leave the domain);
- volume preservation: trace(A[:, :2]) = 0 for every cell.

The basis is built on libcpab's domain [0, 1]^2 so that theta has the same meaning (and the same
scale) as in the official code; `cpab.CPAB` converts the velocities to the [-1, 1]^2 domain.
"""
import functools

import numpy as np
import torch

_AUX_OFFSET = 10.0  # how far the auxiliary valid-outside points lie from the domain (any value > 0 works)


def _square_vertices(nx, ny):
    """Corner coordinates of the squares on [0, 1]^2: xs (nx+1,), ys (ny+1,)."""
    return np.linspace(0.0, 1.0, nx + 1), np.linspace(0.0, 1.0, ny + 1)


def cell_vertices(nx, ny):
    """Vertices of every cell on [0, 1]^2, shape (4 nx ny, 3, 2): (centre, first, second corner).

    The two corners are the end-points of the square edge the triangle touches, in the order
    lower (t=0): (x_i, y_j), (x_i+1, y_j); right (t=1): (x_i+1, y_j), (x_i+1, y_j+1);
    upper (t=2): (x_i+1, y_j+1), (x_i, y_j+1); left (t=3): (x_i, y_j+1), (x_i, y_j).
    """
    xs, ys = _square_vertices(nx, ny)
    verts = np.zeros((4 * nx * ny, 3, 2))
    for j in range(ny):
        for i in range(nx):
            ll, lr = (xs[i], ys[j]), (xs[i + 1], ys[j])
            ur, ul = (xs[i + 1], ys[j + 1]), (xs[i], ys[j + 1])
            centre = (0.5 * (xs[i] + xs[i + 1]), 0.5 * (ys[j] + ys[j + 1]))
            for t, (a, b) in enumerate(((ll, lr), (lr, ur), (ur, ul), (ul, ll))):
                verts[4 * (j * nx + i) + t] = (centre, a, b)
    return verts


def _agree_rows(n_cells, c1, c2, point):
    """Two rows: cells c1 and c2 give the same velocity (both components) at `point`."""
    rows = np.zeros((2, 6 * n_cells))
    hom = np.array([point[0], point[1], 1.0])
    for k in range(2):
        rows[k, 6 * c1 + 3 * k:6 * c1 + 3 * k + 3] = hom
        rows[k, 6 * c2 + 3 * k:6 * c2 + 3 * k + 3] = -hom
    return rows


def constraint_matrix(nx, ny, zero_boundary=False, volume_preservation=False):
    """The constraint matrix L (rows, 6 * 4 nx ny) on the [0, 1]^2 domain, float64."""
    n_cells = 4 * nx * ny
    verts = cell_vertices(nx, ny)
    rows = []

    def cell(i, j, t):
        return 4 * (j * nx + i) + t

    # Continuity: within a square, triangle t shares the centre-to-corner edge with t + 1.
    for j in range(ny):
        for i in range(nx):
            for t in range(4):
                c1, c2 = cell(i, j, t), cell(i, j, (t + 1) % 4)
                for point in (verts[c1, 0], verts[c1, 2]):
                    rows.append(_agree_rows(n_cells, c1, c2, point))
    # Continuity across square edges: right/left neighbours and upper/lower neighbours.
    for j in range(ny):
        for i in range(nx):
            if i + 1 < nx:
                c1, c2 = cell(i, j, 1), cell(i + 1, j, 3)
                for point in (verts[c1, 1], verts[c1, 2]):
                    rows.append(_agree_rows(n_cells, c1, c2, point))
            if j + 1 < ny:
                c1, c2 = cell(i, j, 2), cell(i, j + 1, 0)
                for point in (verts[c1, 1], verts[c1, 2]):
                    rows.append(_agree_rows(n_cells, c1, c2, point))

    if not zero_boundary:
        xs, ys = _square_vertices(nx, ny)
        for j in range(ny - 1):  # left and right sides: agree on the horizontal line y = ys[j+1]
            y = ys[j + 1]
            rows.append(_agree_rows(n_cells, cell(0, j, 3), cell(0, j + 1, 3), (xs[0] - _AUX_OFFSET, y)))
            rows.append(_agree_rows(n_cells, cell(nx - 1, j, 1), cell(nx - 1, j + 1, 1),
                                    (xs[-1] + _AUX_OFFSET, y)))
        for i in range(nx - 1):  # bottom and top sides: agree on the vertical line x = xs[i+1]
            x = xs[i + 1]
            rows.append(_agree_rows(n_cells, cell(i, 0, 0), cell(i + 1, 0, 0), (x, ys[0] - _AUX_OFFSET)))
            rows.append(_agree_rows(n_cells, cell(i, ny - 1, 2), cell(i + 1, ny - 1, 2),
                                    (x, ys[-1] + _AUX_OFFSET)))
    else:
        for c in range(n_cells):
            for point in verts[c]:
                hom = np.array([point[0], point[1], 1.0])
                if point[0] in (0.0, 1.0):  # left/right side: v_x = 0
                    row = np.zeros((1, 6 * n_cells))
                    row[0, 6 * c:6 * c + 3] = hom
                    rows.append(row)
                if point[1] in (0.0, 1.0):  # bottom/top side: v_y = 0
                    row = np.zeros((1, 6 * n_cells))
                    row[0, 6 * c + 3:6 * c + 6] = hom
                    rows.append(row)

    if volume_preservation:
        trace = np.zeros((n_cells, 6 * n_cells))
        for c in range(n_cells):
            trace[c, 6 * c] = 1.0
            trace[c, 6 * c + 4] = 1.0
        rows.append(trace)
    return np.concatenate(rows, axis=0)


def _vertex_to_cell_map(nx, ny):
    """Linear map P (6 nC, 2 nV) from velocities at the tessellation vertices to cell parameters.

    Vertices: the (nx+1)(ny+1) square corners, then the nx ny square centres. The range of P is
    exactly the set of continuous piecewise-affine fields, i.e. the null space of the continuity
    constraints, so P turns the big SVD of L into a small one.
    """
    xs, ys = _square_vertices(nx, ny)
    n_corners = (nx + 1) * (ny + 1)
    n_vertices = n_corners + nx * ny
    verts = cell_vertices(nx, ny)
    P = np.zeros((6 * 4 * nx * ny, 2 * n_vertices))
    for c, tri in enumerate(verts):
        square = c // 4
        i, j = square % nx, square // nx
        ids = [n_corners + square]
        for (x, y) in tri[1:]:
            ids.append(int(np.argmin(np.abs(ys - y))) * (nx + 1) + int(np.argmin(np.abs(xs - x))))
        # A_c @ [v; 1] = w_v for the three vertices: A_c = W_c @ inv(V_c).
        inv_v = np.linalg.inv(np.concatenate([tri.T, np.ones((1, 3))], axis=0))
        for k in range(2):
            for m in range(3):
                for col in range(3):
                    P[6 * c + 3 * k + col, 2 * ids[m] + k] += inv_v[m, col]
    return P


@functools.lru_cache(maxsize=32)
def _null_space(nx, ny, zero_boundary, volume_preservation):
    # Small dense float64 linear algebra through torch.linalg (numpy's threaded LAPACK is pathologically
    # slow on busy machines). The null space of K is the eigenspace of K^T K at 0: the spectrum has a
    # wide gap (largest null eigenvalue ~1e-11, smallest other ~0.3 for every size in DESIGN's table).
    P = torch.from_numpy(_vertex_to_cell_map(nx, ny))
    K = torch.from_numpy(constraint_matrix(nx, ny, zero_boundary, volume_preservation)) @ P
    eigenvalues, eigenvectors = torch.linalg.eigh(K.T @ K)
    null = eigenvectors[:, eigenvalues <= 1e-9 * eigenvalues[-1].clamp(min=1.0)]
    u, _ = torch.linalg.qr(P @ null)  # orthonormalise the same subspace
    u = u.numpy()
    basis = np.ascontiguousarray(u)
    basis.setflags(write=False)
    return basis


def null_space_basis(nx, ny, zero_boundary=False, volume_preservation=False):
    """Orthonormal basis (6 * 4 nx ny, d) float64 numpy array (read-only, cached in memory)."""
    for name, value in (("nx", nx), ("ny", ny)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"tessellation size {name} must be a positive int, got {value!r}")
    return _null_space(int(nx), int(ny), bool(zero_boundary), bool(volume_preservation))
