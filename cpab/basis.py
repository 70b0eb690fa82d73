"""Tessellation and constraint null-space bases of 2-D CPA velocity fields.

Tessellation (libcpab's): the domain is split into nx x ny equal rectangles ("squares"), each
split by its two diagonals into 4 triangles, so there are nC = 4 * nx * ny cells. Cell numbering:

    c = 4 * (j * nx + i) + t

with i in [0, nx) the column (x index), j in [0, ny) the row (y index) and t the triangle of the
square that touches its edge at lower y (t = 0), right x (t = 1), upper y (t = 2), left x (t = 3).

Parameters: every cell holds a 2 x 3 affine matrix [[a11, a12, b1], [a21, a22, b2]] (stored
row-major as 6 numbers), the velocity in that cell is v(p) = A[:, :2] p + A[:, 2]. A constraint
matrix L (rows x 6 nC) collects linear constraints on the stacked parameters; a basis is an
orthonormal basis B (float64) of its null space, so A = reshape(B @ theta).

Constraint sets (the same spaces in both constructions below):
- continuity (always): two triangles that share an edge agree at both edge end-points;
- valid outside (zero_boundary=False, libcpab's default and what CPABMM uses): for every pair of
  boundary triangles lying along the same side of the domain in neighbouring squares, the two
  affine maps also agree at a point on the line through their shared vertex perpendicular to that
  side, hence on the whole line; the field then extends continuously outside the domain;
- zero boundary (zero_boundary=True): the normal velocity component is 0 at every cell vertex on the
  domain border (v_x = 0 on the left/right sides, v_y = 0 on the bottom/top sides; both at corners),
  so the field is tangent to the border and the square is mapped onto itself; libcpab's rows are the
  same (measured: its fields have |v_x| < 1e-15 on x = 0 and x = 1);
- volume preservation: trace(A[:, :2]) = 0 for every cell.

Two bases of the same space (`null_space_basis(..., basis=...)`):
- "libcpab" (default): libcpab's own. Its L (`libcpab_constraint_matrix`: its rows, in its
  construction order, with its vertex order and its auxiliary points; equal to libcpab's bit for bit)
  and its null-space routine (`libcpab_svd_basis`): the right singular vectors of a full LAPACK gesdd
  SVD of L whose singular values are <= 1e-6. Any orthonormal basis spans the space, but they differ by
  a rotation of theta, and Adam (the official fit) is not rotation-invariant, so only libcpab's basis
  reproduces the official fits. The SVD's null vectors depend on the LAPACK kernels and thread count
  (libcpab's too: a SkylakeX and a Haswell OpenBLAS give bases 0.4 apart), so the bases of the released
  configs' tessellations (`SHIPPED`) are data, cpab/bases/*.npz, computed under one reproducible setup
  (OpenBLAS's Haswell kernels, one thread; `python -m cpab.make_bases`) and checked against libcpab
  0.1.3 under that setup (tests/cpab/test_libcpab.py). Other sizes are computed on first use with
  numpy's SVD (gesdd, the routine behind libcpab's scipy.linalg.svd) on this machine's LAPACK, as
  libcpab would (numpy's and scipy's OpenBLAS builds agree bit for bit on all 20 sizes of the dimension
  table (tests/cpab/test_basis.py) but the 8x8 zero-boundary one, measured on one machine).
- "vertex": this project's earlier basis: the small null space of the constraints composed with the
  vertex-to-cell map (eigh), orthonormalised by QR; cheaper to build, theta rotated w.r.t. libcpab.

Both are built on libcpab's domain [0, 1]^2 so that theta has the same scale as in the official
code; `cpab.CPAB` converts the velocities to the [-1, 1]^2 domain.
"""
import functools
import importlib.resources

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
    """This project's compact constraint matrix L (rows, 6 * 4 nx ny) on [0, 1]^2, float64 (no redundant
    rows; the "vertex" basis is built from it). Same null space as `libcpab_constraint_matrix`."""
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


def _hashable_vertices(nx, ny):
    """Per cell, its 3 vertices as homogeneous (x, y, 1.0) tuples of Python floats (libcpab's form)."""
    verts = cell_vertices(nx, ny)
    return [tuple((float(x), float(y), 1.0) for x, y in cell) for cell in verts]


def _libcpab_pair_rows(n_cells, pairs):
    """Rows for (i, j, (v0, v1)): for each vertex, then each velocity component, cell i minus cell j."""
    rows = np.zeros((4 * len(pairs), 6 * n_cells))
    r = 0
    for i, j, pair_vertices in pairs:
        for v in pair_vertices:
            for k in range(2):
                rows[r, 6 * i + 3 * k:6 * i + 3 * k + 3] = v
                rows[r, 6 * j + 3 * k:6 * j + 3 * k + 3] = [-e for e in v]
                r += 1
    return rows


def libcpab_constraint_matrix(nx, ny, zero_boundary=False, volume_preservation=False):
    """libcpab's constraint matrix L (rows, 6 * 4 nx ny) on [0, 1]^2, float64, row for row.

    Its construction, which fixes the rows, their order and the vertex order in each (the SVD basis
    depends on all three): continuity for every pair of cells i < j sharing an edge, in lexicographic
    (i, j) order, at the two shared vertices in the iteration order of the Python set
    `set(vertices_i).intersection(vertices_j)` (homogeneous (x, y, 1.0) tuples); then, valid outside
    only, every pair i < j of neighbouring boundary triangles on one side, in (i, j) order, at their
    shared vertex and a point 10 units from it along the side's normal line (x - 10 on the left and
    right sides, y - 10 on the bottom and top ones); each pair gives, per vertex and per velocity
    component, the row "cell i minus cell j". Then the zero-boundary rows (per cell, per vertex in the
    cell's order (centre, first, second corner): v_x = 0 if the vertex has x in {0, 1}, then v_y = 0 if
    y in {0, 1}) and the trace rows (one per cell).
    """
    n_cells = 4 * nx * ny
    vertices = _hashable_vertices(nx, ny)

    def cell(i, j, t):
        return 4 * (j * nx + i) + t

    edge_pairs = []
    for j in range(ny):
        for i in range(nx):
            for t in range(4):
                edge_pairs.append(tuple(sorted((cell(i, j, t), cell(i, j, (t + 1) % 4)))))
            if i + 1 < nx:
                edge_pairs.append((cell(i, j, 1), cell(i + 1, j, 3)))
            if j + 1 < ny:
                edge_pairs.append((cell(i, j, 2), cell(i, j + 1, 0)))
    pairs = []
    for c1, c2 in sorted(edge_pairs):
        shared = list(set(vertices[c1]).intersection(vertices[c2]))
        pairs.append((c1, c2, shared[:2]))
    if not zero_boundary:
        outside = []  # (c1, c2, axis along which the auxiliary point moves)
        for j in range(ny - 1):
            outside.append((cell(0, j, 3), cell(0, j + 1, 3), 0))
            outside.append((cell(nx - 1, j, 1), cell(nx - 1, j + 1, 1), 0))
        for i in range(nx - 1):
            outside.append((cell(i, 0, 0), cell(i + 1, 0, 0), 1))
            outside.append((cell(i, ny - 1, 2), cell(i + 1, ny - 1, 2), 1))
        for c1, c2, axis in sorted(outside):
            (shared,) = set(vertices[c1]).intersection(vertices[c2])
            aux = list(shared)
            aux[axis] -= 10
            pairs.append((c1, c2, [shared, tuple(aux)]))
    rows = [_libcpab_pair_rows(n_cells, pairs)]
    if zero_boundary:
        for c in range(n_cells):
            for v in vertices[c]:
                for k in range(2):
                    if v[k] in (0.0, 1.0):
                        row = np.zeros((1, 6 * n_cells))
                        row[0, 6 * c + 3 * k:6 * c + 3 * k + 3] = v
                        rows.append(row)
    if volume_preservation:
        trace = np.zeros((n_cells, 6 * n_cells))
        for c in range(n_cells):
            trace[c, 6 * c] = trace[c, 6 * c + 4] = 1.0
        rows.append(trace)
    return np.concatenate(rows, axis=0)


BASES = ("libcpab", "vertex")
SINGULAR_VALUE_TOL = 1e-6  # libcpab's: singular values <= this count as zero
# The released configs' tessellations (partial 4x4, global 6x6; valid outside, with and without volume
# preservation): their libcpab bases are shipped in cpab/bases/ (see `cpab.make_bases`).
SHIPPED = tuple((n, n, False, vp) for n in (4, 6) for vp in (False, True))


def shipped_basis_name(nx, ny, zero_boundary, volume_preservation):
    """File name, inside cpab/bases/, of a shipped libcpab basis."""
    return f"libcpab_{nx}x{ny}_{'zb' if zero_boundary else 'vo'}{'_vp' if volume_preservation else ''}.npz"


def libcpab_svd_basis(L):
    """libcpab's null-space routine: rows of V^T of a full SVD (numpy: LAPACK gesdd) with s <= 1e-6."""
    _, s, vh = np.linalg.svd(L, full_matrices=True)
    null = np.ones(L.shape[1], dtype=bool)
    null[:s.shape[0]] = s <= SINGULAR_VALUE_TOL
    return np.ascontiguousarray(vh[null].T)


def _load_shipped(nx, ny, zero_boundary, volume_preservation):
    name = shipped_basis_name(nx, ny, zero_boundary, volume_preservation)
    resource = importlib.resources.files(__package__).joinpath("bases", name)
    with resource.open("rb") as f, np.load(f) as data:
        basis = data["basis"]
    if basis.dtype != np.float64 or basis.ndim != 2 or basis.shape[0] != 24 * nx * ny:
        raise ValueError(f"cpab/bases/{name}: expected a float64 array with {24 * nx * ny} rows, "
                         f"got {basis.dtype} {basis.shape}; regenerate it with python -m cpab.make_bases")
    return basis


@functools.lru_cache(maxsize=32)
def _libcpab_basis(nx, ny, zero_boundary, volume_preservation):
    if (nx, ny, zero_boundary, volume_preservation) in SHIPPED:
        basis = _load_shipped(nx, ny, zero_boundary, volume_preservation)
    else:
        basis = libcpab_svd_basis(libcpab_constraint_matrix(nx, ny, zero_boundary, volume_preservation))
    basis.setflags(write=False)
    return basis


@functools.lru_cache(maxsize=32)
def _vertex_basis(nx, ny, zero_boundary, volume_preservation):
    # Small dense float64 linear algebra through torch.linalg (numpy's threaded LAPACK is pathologically
    # slow on busy machines). The null space of K is the eigenspace of K^T K at 0: the spectrum has a
    # wide gap (largest null eigenvalue ~1e-11, smallest other ~0.3 for every size in DESIGN's table).
    P = torch.from_numpy(_vertex_to_cell_map(nx, ny))
    K = torch.from_numpy(constraint_matrix(nx, ny, zero_boundary, volume_preservation)) @ P
    eigenvalues, eigenvectors = torch.linalg.eigh(K.T @ K)
    null = eigenvectors[:, eigenvalues <= 1e-9 * eigenvalues[-1].clamp(min=1.0)]
    u, _ = torch.linalg.qr(P @ null)  # orthonormalise the same subspace
    basis = np.ascontiguousarray(u.numpy())
    basis.setflags(write=False)
    return basis


def null_space_basis(nx, ny, zero_boundary=False, volume_preservation=False, basis="libcpab"):
    """Orthonormal basis (6 * 4 nx ny, d) float64 numpy array (read-only, cached in memory).

    basis="libcpab" (default): libcpab's own basis (shipped for `SHIPPED`, else computed by its SVD);
    basis="vertex": this project's earlier basis of the same space (theta rotated). See the module doc.
    """
    for name, value in (("nx", nx), ("ny", ny)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"tessellation size {name} must be a positive int, got {value!r}")
    if basis not in BASES:
        raise ValueError(f"basis must be one of {BASES}, got {basis!r}")
    build = _libcpab_basis if basis == "libcpab" else _vertex_basis
    return build(int(nx), int(ny), bool(zero_boundary), bool(volume_preservation))
