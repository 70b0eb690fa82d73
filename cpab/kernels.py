"""Triton kernels of the fast path: the same code compiled for CUDA and run by Triton's interpreter on CPU.

This module imports triton; `cpab.fused` imports it on first use of the Triton backend, so `import cpab`
never does. On CPU tensors the kernels need the interpreter: TRITON_INTERPRET=1 must be set when this
module is first imported (`triton.jit` reads it then; see cpab/README.md).

Conventions are those of `cpab.integrate` (domain [-1, 1]^2, points (x, y), cell numbering, the stepping
rule, per-cell affines (B, nC, 6) row-major [a11, a12, b1, a21, a22, b2]), with T = steps * 2**refine ticks
and the flow table (B, nC, refine + 1, 6). Two kernels:

`_points_kernel` (one program per BLOCK points; every point keeps its state in registers and loops over
its steps with a per-lane mask; no host synchronisation, the loop ends when the block's last point is
done). It makes the reference's decisions with the reference's float operations in the same order
(IEEE division `_div`, no FMA contraction), so on one device both take the same steps. Modes:
  FORWARD   x_K;
  JACOBIAN  x_K and the 2 x 2 Jacobian J = d x_K / d x_0 (4 registers along the path);
  ADJOINT   for a cotangent g of x_K (any strides): lambda_0 = J^T g (from the stored J), then a second
            sweep that recomputes the same steps and carries lambda forwards, lambda_{k+1} = M_k^-T lambda_k
            (M_k = d x_{k+1} / d x_k: the step's linear part, or through the crossing correction), adding
            lambda_{k+1} [x_k; 1]^T into the gradient of the table entry used and the corrections' terms into
            the affines' gradient;
  FIT       one Adam iteration's point work: sweep 1 (x_K, J), residual r = x_K - y, lambda_K = r
            (loss 0, the batch-wide norm: the 1/|r| scale is applied by the cells kernel, and |r|^2 is
            added to a per-iteration scalar) or 2 r (loss 1, least squares), lambda_0 = J^T lambda_K, sweep 2;
  ROWS      the Jacobian rows of x_K w.r.t. the table: sweep 1, then sweep 2 with two cotangents at once
            (e_0 and e_1), each into its own gradient row (2 per point), for Gauss-Newton and
            `transform_jacobian`; optionally r = x_K - y into the last column of the augmented rows.
Gradients go to `grad` (rows, nC, refine + 2, 6): levels 0..refine are the table's, slot refine + 1 the
affines'. A lane sums a run of steps on one entry in registers and flushes it when the entry changes;
the flushes of a block are pre-reduced (the lanes that flush the block's smallest entry are summed and
added once: dense grids, where neighbouring points take the same steps; the keypoint fits' few points
per transform rarely share an entry and skip it) and all atomics are relaxed (plain reductions, no fences).

`_cells_kernel` (one program per gradient row; lanes over cells, tiles over the basis for its products):
the flow table in float64, level 0 = expm(A / T) by scaling and squaring per cell (2**-s with s the
smallest that brings the matrix's infinity norm to 1/8, a degree-10 Taylor polynomial, s squarings),
each further level the square of the previous one, cast to the input dtype; its adjoint: back through
the level squarings (table[l] = table[l-1]^2, with the table's values) and through expm by the
block-triangular identity expm([[X, E], [0, X]]) = [[e^X, L(X, E)], [0, e^X]] (the adjoint Frechet
derivative is L(X^T, G) = L(X, G^T)^T), then d theta = basis^T dA; the faithful Adam update on the
device (state m, v; the step's constants from a table indexed by a launch argument); the Gauss-Newton
candidate theta + delta. It zeroes the gradient entries it consumes, so the next iteration's points
kernel finds them zero.

`_lm_kernel` (one program per transform): the Levenberg-Marquardt bookkeeping of `cpab.fit.fit_gauss_newton`
(accept or refuse the candidate, mu, the next damped normal equations) from [J | r]^T [J | r].
"""
import os

import triton
import triton.language as tl

try:  # read by triton.jit below: fixed for this process
    INTERPRETED = bool(triton.knobs.runtime.interpret)
except AttributeError:  # triton before knobs: the same environment variable
    INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").lower() not in ("", "0", "false", "off")
FORWARD, JACOBIAN, ADJOINT, FIT, ROWS = 0, 1, 2, 3, 4
UPDATE_NONE, UPDATE_WRITE, UPDATE_ADAM, UPDATE_CANDIDATE, UPDATE_ADAM_INIT = 0, 1, 2, 3, 4
LM_START, LM_ACCEPT, LM_STEP = 0, 1, 2
DEGREE = 10  # the flow table's Taylor polynomial (of a matrix of norm <= 1/8: truncation below 1e-17)
CHUNK = 8    # basis rows per tile in the cells kernel's products
_DEGREE = tl.constexpr(DEGREE)
_CHUNK = tl.constexpr(CHUNK)
_BIG = tl.constexpr(2147483647)


@triton.jit
def _div(a, b):
    """a / b rounded to nearest (the reference's division); Triton's fp32 `/` is approximate when compiled."""
    if a.dtype == tl.float32:
        return tl.math.div_rn(a, tl.cast(b, tl.float32))
    else:
        return a / b


@triton.jit
def _sqrt(a):
    """Square root rounded to nearest (torch's); Triton's fp32 sqrt is approximate when compiled."""
    if a.dtype == tl.float32:
        return tl.sqrt_rn(a)
    else:
        return tl.sqrt(a)


@triton.jit
def _cell_index(y0, y1, nx, half_nx, half_ny, max_i, max_j):
    """`cpab.integrate.cell_index` per lane, operation by operation (int32). NaN coordinates give cell
    indices in range (the NaN itself propagates through the positions)."""
    u = (y0 + 1.0) * half_nx
    w = (y1 + 1.0) * half_ny
    u = tl.where(u == u, u, 0.0)
    w = tl.where(w == w, w, 0.0)
    fi = tl.minimum(tl.maximum(tl.floor(u), 0.0), max_i)
    fj = tl.minimum(tl.maximum(tl.floor(w), 0.0), max_j)
    p = 2.0 * (u - fi) - 1.0
    q = 2.0 * (w - fj) - 1.0
    a_pos = (p + q) >= 0.0
    b_pos = (p - q) >= 0.0
    tri = tl.where(a_pos, tl.where(b_pos, 1, 2), tl.where(b_pos, 0, 3))
    return 4 * (fj.to(tl.int32) * nx + fi.to(tl.int32)) + tri


@triton.jit
def _correction(x0, x1, z0, z1, o0, o1, o2, o3, o4, o5, n0, n1, n2, n3, n4, n5, dur, eps):
    """`cpab.integrate.crossing_correction` per lane, operation by operation. Returns
    (out0, out1, ratio, den, tau, h, c0, c1, vo0, vo1, lo0, lo1, vn0, vn1, ln0, ln1, f0, f1, d00, d01, num)."""
    D0 = o0 - n0
    D1 = o1 - n1
    D2 = o2 - n2
    D3 = o3 - n3
    D4 = o4 - n4
    D5 = o5 - n5
    d00 = D0 * x0 + D1 * x1 + D2
    d01 = D3 * x0 + D4 * x1 + D5
    d10 = D0 * z0 + D1 * z1 + D2
    d11 = D3 * z0 + D4 * z1 + D5
    f0 = d00 - d10
    f1 = d01 - d11
    num = d00 * f0 + d01 * f1
    den = f0 * f0 + f1 * f1 + eps
    ratio = _div(num, den)
    alpha = tl.minimum(tl.maximum(ratio, 0.0), 1.0)
    tau = (1.0 - alpha) * dur
    h = 0.5 * tau * tau
    vo0 = o0 * z0 + o1 * z1 + o2
    vo1 = o3 * z0 + o4 * z1 + o5
    lo0 = o0 * vo0 + o1 * vo1
    lo1 = o3 * vo0 + o4 * vo1
    c0 = z0 - tau * vo0 + h * lo0
    c1 = z1 - tau * vo1 + h * lo1
    vn0 = n0 * c0 + n1 * c1 + n2
    vn1 = n3 * c0 + n4 * c1 + n5
    ln0 = n0 * vn0 + n1 * vn1
    ln1 = n3 * vn0 + n4 * vn1
    out0 = c0 + tau * vn0 + h * ln0
    out1 = c1 + tau * vn1 + h * ln1
    return out0, out1, ratio, den, tau, h, c0, c1, vo0, vo1, lo0, lo1, vn0, vn1, ln0, ln1, f0, f1, d00, d01, num


@triton.jit
def _correction_vjp(w0, w1, x0, x1, z0, z1, o0, o1, o3, o4, n0, n1, n3, n4, dur,
                    ratio, den, tau, h, c0, c1, vo0, vo1, lo0, lo1, vn0, vn1, ln0, ln1, f0, f1, d00, d01, num):
    """Vector-Jacobian product of `_correction` for the cotangent w of its output: the gradients w.r.t.
    x (2), x_end z (2), A_old (6) and A_new (6), in that order (the backward formulas of autograd)."""
    gxc0 = w0
    gxc1 = w1
    gln0 = h * w0
    gln1 = h * w1
    gh = w0 * ln0 + w1 * ln1
    gtau = w0 * vn0 + w1 * vn1
    gvn0 = tau * w0 + (n0 * gln0 + n3 * gln1)
    gvn1 = tau * w1 + (n1 * gln0 + n4 * gln1)
    gn0 = gln0 * vn0 + gvn0 * c0
    gn1 = gln0 * vn1 + gvn0 * c1
    gn2 = gvn0
    gn3 = gln1 * vn0 + gvn1 * c0
    gn4 = gln1 * vn1 + gvn1 * c1
    gn5 = gvn1
    gxc0 = gxc0 + (n0 * gvn0 + n3 * gvn1)
    gxc1 = gxc1 + (n1 * gvn0 + n4 * gvn1)
    glo0 = h * gxc0
    glo1 = h * gxc1
    gh = gh + (gxc0 * lo0 + gxc1 * lo1)
    gtau = gtau - (gxc0 * vo0 + gxc1 * vo1)
    gvo0 = (o0 * glo0 + o3 * glo1) - tau * gxc0
    gvo1 = (o1 * glo0 + o4 * glo1) - tau * gxc1
    go0 = glo0 * vo0 + gvo0 * z0
    go1 = glo0 * vo1 + gvo0 * z1
    go2 = gvo0
    go3 = glo1 * vo0 + gvo1 * z0
    go4 = glo1 * vo1 + gvo1 * z1
    go5 = gvo1
    gz0 = gxc0 + (o0 * gvo0 + o3 * gvo1)
    gz1 = gxc1 + (o1 * gvo0 + o4 * gvo1)
    gtau = gtau + gh * tau
    gratio = tl.where((ratio >= 0.0) & (ratio <= 1.0), -gtau * dur, 0.0)
    gnum = _div(gratio, den)
    gden = -gratio * _div(ratio, den)
    gf0 = gnum * d00 + 2.0 * gden * f0
    gf1 = gnum * d01 + 2.0 * gden * f1
    gd00 = gnum * f0 + gf0
    gd01 = gnum * f1 + gf1
    gd10 = -gf0
    gd11 = -gf1
    D0 = o0 - n0
    D1 = o1 - n1
    D3 = o3 - n3
    D4 = o4 - n4
    gD0 = gd00 * x0 + gd10 * z0
    gD1 = gd00 * x1 + gd10 * z1
    gD2 = gd00 + gd10
    gD3 = gd01 * x0 + gd11 * z0
    gD4 = gd01 * x1 + gd11 * z1
    gD5 = gd01 + gd11
    gx0 = D0 * gd00 + D3 * gd01
    gx1 = D1 * gd00 + D4 * gd01
    gz0 = gz0 + (D0 * gd10 + D3 * gd11)
    gz1 = gz1 + (D1 * gd10 + D4 * gd11)
    return (gx0, gx1, gz0, gz1, go0 + gD0, go1 + gD1, go2 + gD2, go3 + gD3, go4 + gD4, go5 + gD5,
            gn0 - gD0, gn1 - gD1, gn2 - gD2, gn3 - gD3, gn4 - gD4, gn5 - gD5)


@triton.jit
def _add6(ptr, key, mask, a0, a1, a2, a3, a4, a5, PRE: tl.constexpr):
    """ptr[key + i] += a_i (i < 6) for the masked lanes, relaxed atomics. PRE: the lanes whose key is the
    block's smallest are summed first and added once (lanes of a block often flush the same entry)."""
    if PRE:
        if tl.max(mask.to(tl.int32), axis=0) > 0:
            lead = tl.min(tl.where(mask, key, _BIG), axis=0)
            same = mask & (key == lead)
            tl.atomic_add(ptr + lead, tl.sum(tl.where(same, a0, 0.0), axis=0), sem="relaxed")
            tl.atomic_add(ptr + lead + 1, tl.sum(tl.where(same, a1, 0.0), axis=0), sem="relaxed")
            tl.atomic_add(ptr + lead + 2, tl.sum(tl.where(same, a2, 0.0), axis=0), sem="relaxed")
            tl.atomic_add(ptr + lead + 3, tl.sum(tl.where(same, a3, 0.0), axis=0), sem="relaxed")
            tl.atomic_add(ptr + lead + 4, tl.sum(tl.where(same, a4, 0.0), axis=0), sem="relaxed")
            tl.atomic_add(ptr + lead + 5, tl.sum(tl.where(same, a5, 0.0), axis=0), sem="relaxed")
            rest = mask & (key != lead)
            tl.atomic_add(ptr + key, a0, mask=rest, sem="relaxed")
            tl.atomic_add(ptr + key + 1, a1, mask=rest, sem="relaxed")
            tl.atomic_add(ptr + key + 2, a2, mask=rest, sem="relaxed")
            tl.atomic_add(ptr + key + 3, a3, mask=rest, sem="relaxed")
            tl.atomic_add(ptr + key + 4, a4, mask=rest, sem="relaxed")
            tl.atomic_add(ptr + key + 5, a5, mask=rest, sem="relaxed")
    else:
        tl.atomic_add(ptr + key, a0, mask=mask, sem="relaxed")
        tl.atomic_add(ptr + key + 1, a1, mask=mask, sem="relaxed")
        tl.atomic_add(ptr + key + 2, a2, mask=mask, sem="relaxed")
        tl.atomic_add(ptr + key + 3, a3, mask=mask, sem="relaxed")
        tl.atomic_add(ptr + key + 4, a4, mask=mask, sem="relaxed")
        tl.atomic_add(ptr + key + 5, a5, mask=mask, sem="relaxed")


@triton.jit
def _sweep(x0, x1, active, b_cells, grow, lam0, lam1, mu0, mu1, table_ptr, affines_ptr, grad_ptr,
           nx, half_nx, half_ny, max_i, max_j, total_ticks, max_crossings, eps, row_stride,
           refine, JAC: tl.constexpr, ADJ: tl.constexpr, TWO: tl.constexpr, PRE: tl.constexpr,
           BLOCK: tl.constexpr):
    """Integrates the lanes' points (x0, x1) through the table of their transform (rows b_cells // nC).

    JAC: also accumulate J = d x_K / d x_0. ADJ: carry lambda (and with TWO also mu, a second cotangent)
    forwards and add the table / affine gradients into grad row `grow` (and `grow + 1`).
    Returns (x0, x1, J00, J01, J10, J11)."""
    cell = _cell_index(x0, x1, nx, half_nx, half_ny, max_i, max_j)
    zero = x0 * 0.0
    tick = tl.zeros([BLOCK], dtype=tl.int32)
    level = tick + refine
    bracket = tick - 1
    crossings = tick
    j00 = zero + 1.0
    j01 = zero
    j10 = zero
    j11 = zero + 1.0
    run = tick - 1  # gradient offset of the current run's (cell, level) entry, -1: none yet
    acc0 = zero
    acc1 = zero
    acc2 = zero
    acc3 = zero
    acc4 = zero
    acc5 = zero
    bcc0 = zero
    bcc1 = zero
    bcc2 = zero
    bcc3 = zero
    bcc4 = zero
    bcc5 = zero
    grow_base = grow * row_stride
    active = active & (tick < total_ticks)
    while tl.max(active.to(tl.int32), axis=0) > 0:
        key = (b_cells + cell) * (refine + 1) + level
        e0 = tl.load(table_ptr + 6 * key, mask=active, other=1.0)
        e1 = tl.load(table_ptr + 6 * key + 1, mask=active, other=0.0)
        e2 = tl.load(table_ptr + 6 * key + 2, mask=active, other=0.0)
        e3 = tl.load(table_ptr + 6 * key + 3, mask=active, other=0.0)
        e4 = tl.load(table_ptr + 6 * key + 4, mask=active, other=1.0)
        e5 = tl.load(table_ptr + 6 * key + 5, mask=active, other=0.0)
        y0 = e0 * x0 + e1 * x1 + e2
        y1 = e3 * x0 + e4 * x1 + e5
        new_cell = _cell_index(y0, y1, nx, half_nx, half_ny, max_i, max_j)
        moved = new_cell != cell
        reject = active & moved & (level > 0) & (crossings < max_crossings)
        accept = active & (reject == 0)
        crossed = accept & moved
        m00 = e0
        m01 = e1
        m10 = e3
        m11 = e4
        rz0 = zero
        rz1 = zero
        sz0 = zero
        sz1 = zero
        ro0 = zero
        ro1 = zero
        ro2 = zero
        ro3 = zero
        ro4 = zero
        ro5 = zero
        rn0 = zero
        rn1 = zero
        rn2 = zero
        rn3 = zero
        rn4 = zero
        rn5 = zero
        so0 = zero
        so1 = zero
        so2 = zero
        so3 = zero
        so4 = zero
        so5 = zero
        sn0 = zero
        sn1 = zero
        sn2 = zero
        sn3 = zero
        sn4 = zero
        sn5 = zero
        old_base = 6 * (b_cells + cell)
        new_base = 6 * (b_cells + new_cell)
        # gradient slots of the two cells' affines (the new cell is the uncorrected end's, as in the correction)
        old_g = grow_base + (cell * (refine + 2) + refine + 1) * 6
        new_g = grow_base + (new_cell * (refine + 2) + refine + 1) * 6
        if tl.max(crossed.to(tl.int32), axis=0) > 0:
            o0 = tl.load(affines_ptr + old_base, mask=crossed, other=0.0)
            o1 = tl.load(affines_ptr + old_base + 1, mask=crossed, other=0.0)
            o2 = tl.load(affines_ptr + old_base + 2, mask=crossed, other=0.0)
            o3 = tl.load(affines_ptr + old_base + 3, mask=crossed, other=0.0)
            o4 = tl.load(affines_ptr + old_base + 4, mask=crossed, other=0.0)
            o5 = tl.load(affines_ptr + old_base + 5, mask=crossed, other=0.0)
            n0 = tl.load(affines_ptr + new_base, mask=crossed, other=0.0)
            n1 = tl.load(affines_ptr + new_base + 1, mask=crossed, other=0.0)
            n2 = tl.load(affines_ptr + new_base + 2, mask=crossed, other=0.0)
            n3 = tl.load(affines_ptr + new_base + 3, mask=crossed, other=0.0)
            n4 = tl.load(affines_ptr + new_base + 4, mask=crossed, other=0.0)
            n5 = tl.load(affines_ptr + new_base + 5, mask=crossed, other=0.0)
            dur = _div((1 << level).to(x0.dtype), total_ticks.to(x0.dtype))
            (k0, k1, ratio, den, tau, h, c0, c1, vo0, vo1, lo0, lo1, vn0, vn1, ln0, ln1, f0, f1, d00, d01,
             num) = _correction(x0, x1, y0, y1, o0, o1, o2, o3, o4, o5, n0, n1, n2, n3, n4, n5, dur, eps)
            if JAC or ADJ:
                (rx0, rx1, rz0, rz1, ro0, ro1, ro2, ro3, ro4, ro5, rn0, rn1, rn2, rn3, rn4, rn5) = _correction_vjp(
                    zero + 1.0, zero, x0, x1, y0, y1, o0, o1, o3, o4, n0, n1, n3, n4, dur,
                    ratio, den, tau, h, c0, c1, vo0, vo1, lo0, lo1, vn0, vn1, ln0, ln1, f0, f1, d00, d01, num)
                (sx0, sx1, sz0, sz1, so0, so1, so2, so3, so4, so5, sn0, sn1, sn2, sn3, sn4, sn5) = _correction_vjp(
                    zero, zero + 1.0, x0, x1, y0, y1, o0, o1, o3, o4, n0, n1, n3, n4, dur,
                    ratio, den, tau, h, c0, c1, vo0, vo1, lo0, lo1, vn0, vn1, ln0, ln1, f0, f1, d00, d01, num)
                # step Jacobian M = d x_{k+1} / d x_k through the correction
                m00 = tl.where(crossed, rx0 + rz0 * e0 + rz1 * e3, e0)
                m01 = tl.where(crossed, rx1 + rz0 * e1 + rz1 * e4, e1)
                m10 = tl.where(crossed, sx0 + sz0 * e0 + sz1 * e3, e3)
                m11 = tl.where(crossed, sx1 + sz0 * e1 + sz1 * e4, e4)
            y0 = tl.where(crossed, k0, y0)
            y1 = tl.where(crossed, k1, y1)
            new_cell = tl.where(crossed, _cell_index(y0, y1, nx, half_nx, half_ny, max_i, max_j), new_cell)
        if JAC:
            n00 = m00 * j00 + m01 * j10
            n01 = m00 * j01 + m01 * j11
            n10 = m10 * j00 + m11 * j10
            n11 = m10 * j01 + m11 * j11
            j00 = tl.where(accept, n00, j00)
            j01 = tl.where(accept, n01, j01)
            j10 = tl.where(accept, n10, j10)
            j11 = tl.where(accept, n11, j11)
        if ADJ:
            # lambda_{k+1} = M^{-T} lambda_k
            det = m00 * m11 - m01 * m10
            w0 = _div(m11 * lam0 - m10 * lam1, det)
            w1 = _div(m00 * lam1 - m01 * lam0, det)
            # cotangent of E [x; 1]: lambda_{k+1} itself, or through the correction
            gz0 = tl.where(crossed, w0 * rz0 + w1 * sz0, w0)
            gz1 = tl.where(crossed, w0 * rz1 + w1 * sz1, w1)
            _add6(grad_ptr, old_g, crossed, w0 * ro0 + w1 * so0, w0 * ro1 + w1 * so1, w0 * ro2 + w1 * so2,
                  w0 * ro3 + w1 * so3, w0 * ro4 + w1 * so4, w0 * ro5 + w1 * so5, PRE)
            _add6(grad_ptr, new_g, crossed, w0 * rn0 + w1 * sn0, w0 * rn1 + w1 * sn1, w0 * rn2 + w1 * sn2,
                  w0 * rn3 + w1 * sn3, w0 * rn4 + w1 * sn4, w0 * rn5 + w1 * sn5, PRE)
            # dL/dE_k = gz [x_k; 1]^T, summed in registers while the (cell, level) entry stays the same
            gkey = grow_base + (cell * (refine + 2) + level) * 6
            flush = accept & (gkey != run) & (run >= 0)
            _add6(grad_ptr, run, flush, acc0, acc1, acc2, acc3, acc4, acc5, PRE)
            keep = (flush == 0).to(x0.dtype)
            take = accept.to(x0.dtype)
            acc0 = acc0 * keep + take * (gz0 * x0)
            acc1 = acc1 * keep + take * (gz0 * x1)
            acc2 = acc2 * keep + take * gz0
            acc3 = acc3 * keep + take * (gz1 * x0)
            acc4 = acc4 * keep + take * (gz1 * x1)
            acc5 = acc5 * keep + take * gz1
            lam0 = tl.where(accept, w0, lam0)
            lam1 = tl.where(accept, w1, lam1)
            if TWO:
                v0 = _div(m11 * mu0 - m10 * mu1, det)
                v1 = _div(m00 * mu1 - m01 * mu0, det)
                hz0 = tl.where(crossed, v0 * rz0 + v1 * sz0, v0)
                hz1 = tl.where(crossed, v0 * rz1 + v1 * sz1, v1)
                _add6(grad_ptr, old_g + row_stride, crossed, v0 * ro0 + v1 * so0, v0 * ro1 + v1 * so1,
                      v0 * ro2 + v1 * so2, v0 * ro3 + v1 * so3, v0 * ro4 + v1 * so4, v0 * ro5 + v1 * so5, PRE)
                _add6(grad_ptr, new_g + row_stride, crossed, v0 * rn0 + v1 * sn0, v0 * rn1 + v1 * sn1,
                      v0 * rn2 + v1 * sn2, v0 * rn3 + v1 * sn3, v0 * rn4 + v1 * sn4, v0 * rn5 + v1 * sn5, PRE)
                _add6(grad_ptr, run + row_stride, flush, bcc0, bcc1, bcc2, bcc3, bcc4, bcc5, PRE)
                bcc0 = bcc0 * keep + take * (hz0 * x0)
                bcc1 = bcc1 * keep + take * (hz0 * x1)
                bcc2 = bcc2 * keep + take * hz0
                bcc3 = bcc3 * keep + take * (hz1 * x0)
                bcc4 = bcc4 * keep + take * (hz1 * x1)
                bcc5 = bcc5 * keep + take * hz1
                mu0 = tl.where(accept, v0, mu0)
                mu1 = tl.where(accept, v1, mu1)
            run = tl.where(accept, gkey, run)
        bracket = tl.where(reject, tick + (1 << level), bracket)
        x0 = tl.where(accept, y0, x0)
        x1 = tl.where(accept, y1, x1)
        tick = tick + tl.where(accept, 1 << level, 0)
        crossings = crossings + crossed.to(tl.int32)
        cell = tl.where(accept, new_cell, cell)
        bracket = tl.where(crossed | (tick >= bracket), -1, bracket)
        # with no bracket open: the largest level l <= refine with 2**l <= remaining ticks (0 if none):
        # floor(log2(remaining)) is the exponent of its (exact) float32 value
        remaining = total_ticks - tick
        exponent = (tl.maximum(remaining, 1).to(tl.float32).to(tl.int32, bitcast=True) >> 23) - 127
        fitting = tl.minimum(exponent, refine)
        level = tl.where(bracket >= 0, tl.maximum(level - 1, 0), fitting)
        active = active & (remaining > 0)
    if ADJ:
        last = run >= 0
        _add6(grad_ptr, run, last, acc0, acc1, acc2, acc3, acc4, acc5, PRE)
        if TWO:
            _add6(grad_ptr, run + row_stride, last, bcc0, bcc1, bcc2, bcc3, bcc4, bcc5, PRE)
    return x0, x1, j00, j01, j10, j11


@triton.jit
def _linspace(index, n, like):
    """torch.linspace(-1, 1, n)[index] with torch's formula (from the nearer end), in like's dtype."""
    step = _div(like * 0.0 + 2.0, (n - 1 + (n == 1).to(tl.int32)).to(like.dtype))
    low = -1.0 + step * index.to(like.dtype)
    high = 1.0 - step * (n - 1 - index).to(like.dtype)
    return tl.where(index < n // 2, low, high)


@triton.jit(do_not_specialize=["sumsq_slot"])
def _points_kernel(points_ptr, table_ptr, affines_ptr, out_ptr, jac_ptr, aux_ptr, grad_ptr, gpoints_ptr,
                   sumsq_ptr, aug_ptr,
                   n_points, points_per_batch, n_cells, nx, half_nx, half_ny, max_i, max_j,
                   total_ticks, max_crossings, eps, row_stride, width, height, aux_sb, aux_sn, aux_sk,
                   aug_stride, sumsq_slot, refine, loss,
                   MODE: tl.constexpr, GRID: tl.constexpr, GRAD_POINTS: tl.constexpr, HAS_Y: tl.constexpr,
                   BLOCK: tl.constexpr):
    """Points (B * N) of B transforms through the table (B, nC, refine + 1, 6) and affines (B, nC, 6).

    points (B * N, 2), or with GRID the identity grid (height x width, row-major) of every transform.
    FORWARD: out (B * N, 2). JACOBIAN: out and jac (B * N, 4) = [J00, J01, J10, J11]. ADJOINT: aux is the
    cotangent of out with strides (aux_sb, aux_sn, aux_sk); adds into grad rows b; GRAD_POINTS writes
    J^T g into gpoints. FIT: aux = targets y (contiguous); adds into grad rows b; loss 0 adds the block's
    sum of |r|^2 into sumsq[sumsq_slot] (float64). ROWS: out, and grad rows 2 p, 2 p + 1 for point p;
    HAS_Y writes r = out - y into aug[(2 p + k) * aug_stride + aug_stride - 1].
    """
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n_points
    b = offs // points_per_batch
    like = tl.zeros([BLOCK], dtype=table_ptr.dtype.element_ty)
    if GRID:
        n = offs % points_per_batch
        x0 = _linspace(n % width, width, like)
        x1 = _linspace(n // width, height, like)
    else:
        x0 = tl.load(points_ptr + 2 * offs, mask=valid, other=0.0)
        x1 = tl.load(points_ptr + 2 * offs + 1, mask=valid, other=0.0)
    b_cells = b * n_cells
    zero = x0 * 0.0
    if MODE == 0:
        y0, y1, j00, j01, j10, j11 = _sweep(
            x0, x1, valid, b_cells, b, zero, zero, zero, zero, table_ptr, affines_ptr, grad_ptr,
            nx, half_nx, half_ny, max_i, max_j, total_ticks, max_crossings, eps, row_stride,
            refine, False, False, False, False, BLOCK)
        tl.store(out_ptr + 2 * offs, y0, mask=valid)
        tl.store(out_ptr + 2 * offs + 1, y1, mask=valid)
    if MODE == 1:
        y0, y1, j00, j01, j10, j11 = _sweep(
            x0, x1, valid, b_cells, b, zero, zero, zero, zero, table_ptr, affines_ptr, grad_ptr,
            nx, half_nx, half_ny, max_i, max_j, total_ticks, max_crossings, eps, row_stride,
            refine, True, False, False, False, BLOCK)
        tl.store(out_ptr + 2 * offs, y0, mask=valid)
        tl.store(out_ptr + 2 * offs + 1, y1, mask=valid)
        tl.store(jac_ptr + 4 * offs, j00, mask=valid)
        tl.store(jac_ptr + 4 * offs + 1, j01, mask=valid)
        tl.store(jac_ptr + 4 * offs + 2, j10, mask=valid)
        tl.store(jac_ptr + 4 * offs + 3, j11, mask=valid)
    if MODE == 2:
        g_at = b * aux_sb + (offs % points_per_batch) * aux_sn
        g0 = tl.load(aux_ptr + g_at, mask=valid, other=0.0)
        g1 = tl.load(aux_ptr + g_at + aux_sk, mask=valid, other=0.0)
        j00 = tl.load(jac_ptr + 4 * offs, mask=valid, other=0.0)
        j01 = tl.load(jac_ptr + 4 * offs + 1, mask=valid, other=0.0)
        j10 = tl.load(jac_ptr + 4 * offs + 2, mask=valid, other=0.0)
        j11 = tl.load(jac_ptr + 4 * offs + 3, mask=valid, other=0.0)
        lam0 = j00 * g0 + j10 * g1
        lam1 = j01 * g0 + j11 * g1
        if GRAD_POINTS:
            tl.store(gpoints_ptr + 2 * offs, lam0, mask=valid)
            tl.store(gpoints_ptr + 2 * offs + 1, lam1, mask=valid)
        _sweep(x0, x1, valid, b_cells, b, lam0, lam1, zero, zero, table_ptr, affines_ptr, grad_ptr,
               nx, half_nx, half_ny, max_i, max_j, total_ticks, max_crossings, eps, row_stride,
               refine, False, True, False, True, BLOCK)
    if MODE == 3:
        y0, y1, j00, j01, j10, j11 = _sweep(
            x0, x1, valid, b_cells, b, zero, zero, zero, zero, table_ptr, affines_ptr, grad_ptr,
            nx, half_nx, half_ny, max_i, max_j, total_ticks, max_crossings, eps, row_stride,
            refine, True, False, False, False, BLOCK)
        r0 = tl.where(valid, y0 - tl.load(aux_ptr + 2 * offs, mask=valid, other=0.0), 0.0)
        r1 = tl.where(valid, y1 - tl.load(aux_ptr + 2 * offs + 1, mask=valid, other=0.0), 0.0)
        if loss == 0:
            square = r0.to(tl.float64) * r0.to(tl.float64) + r1.to(tl.float64) * r1.to(tl.float64)
            tl.atomic_add(sumsq_ptr + sumsq_slot, tl.sum(square, axis=0), sem="relaxed")
        else:
            r0 = 2.0 * r0
            r1 = 2.0 * r1
        lam0 = j00 * r0 + j10 * r1
        lam1 = j01 * r0 + j11 * r1
        _sweep(x0, x1, valid, b_cells, b, lam0, lam1, zero, zero, table_ptr, affines_ptr, grad_ptr,
               nx, half_nx, half_ny, max_i, max_j, total_ticks, max_crossings, eps, row_stride,
               refine, False, True, False, False, BLOCK)
    if MODE == 4:
        y0, y1, j00, j01, j10, j11 = _sweep(
            x0, x1, valid, b_cells, b, zero, zero, zero, zero, table_ptr, affines_ptr, grad_ptr,
            nx, half_nx, half_ny, max_i, max_j, total_ticks, max_crossings, eps, row_stride,
            refine, True, False, False, False, BLOCK)
        tl.store(out_ptr + 2 * offs, y0, mask=valid)
        tl.store(out_ptr + 2 * offs + 1, y1, mask=valid)
        if HAS_Y:
            r0 = y0 - tl.load(aux_ptr + 2 * offs, mask=valid, other=0.0)
            r1 = y1 - tl.load(aux_ptr + 2 * offs + 1, mask=valid, other=0.0)
            tl.store(aug_ptr + (2 * offs + 1) * aug_stride - 1, r0, mask=valid)
            tl.store(aug_ptr + (2 * offs + 2) * aug_stride - 1, r1, mask=valid)
        # row 2 p: d x_K[0] / d table, lambda_0 = J^T e_0 = (J00, J01); row 2 p + 1: (J10, J11)
        _sweep(x0, x1, valid, b_cells, 2 * offs, j00, j01, j10, j11, table_ptr, affines_ptr, grad_ptr,
               nx, half_nx, half_ny, max_i, max_j, total_ticks, max_crossings, eps, row_stride,
               refine, False, True, True, False, BLOCK)


# ------------------------------------------------------------------------------------------ cells
@triton.jit
def _compose(a0, a1, a2, a3, a4, a5, b0, b1, b2, b3, b4, b5):
    """Affine maps (2 x 3 row-major, homogeneous last row [0 0 1]) composed: a o b."""
    return (a0 * b0 + a1 * b3, a0 * b1 + a1 * b4, a0 * b2 + a1 * b5 + a2,
            a3 * b0 + a4 * b3, a3 * b1 + a4 * b4, a3 * b2 + a4 * b5 + a5)


@triton.jit
def _scaling(x0, x1, x2, x3, x4, x5):
    """Per lane, the squarings s >= 0 that bring |X|_inf / 2**s to at most 1/8, and 2**s (float64)."""
    norm = tl.maximum(tl.abs(x0) + tl.abs(x1) + tl.abs(x2), tl.abs(x3) + tl.abs(x4) + tl.abs(x5))
    s = tl.ceil(tl.log2(tl.maximum(norm * 8.0, 1e-300)))
    s = tl.where(s > 0.0, tl.minimum(s, 60.0), 0.0)  # NaN -> 0
    return s.to(tl.int32), tl.exp2(s)


@triton.jit
def _expm(x0, x1, x2, x3, x4, x5):
    """expm of the homogeneous [[X], [0 0 0]], X (2 x 3) float64: scaling by 2**-s (per lane, `_scaling`),
    degree-DEGREE Taylor polynomial (Horner), s squarings. Returns the 2 x 3 top of the result."""
    s, factor = _scaling(x0, x1, x2, x3, x4, x5)
    x0 = x0 / factor
    x1 = x1 / factor
    x2 = x2 / factor
    x3 = x3 / factor
    x4 = x4 / factor
    x5 = x5 / factor
    p0 = 1.0 + x0 / _DEGREE
    p1 = x1 / _DEGREE
    p2 = x2 / _DEGREE
    p3 = x3 / _DEGREE
    p4 = 1.0 + x4 / _DEGREE
    p5 = x5 / _DEGREE
    for k in tl.static_range(_DEGREE - 1, 0, -1):
        # P = I + X P / k  (X's last row is 0, P's is [0 0 1])
        q0 = (x0 * p0 + x1 * p3) / k
        q1 = (x0 * p1 + x1 * p4) / k
        q2 = (x0 * p2 + x1 * p5 + x2) / k
        q3 = (x3 * p0 + x4 * p3) / k
        q4 = (x3 * p1 + x4 * p4) / k
        q5 = (x3 * p2 + x4 * p5 + x5) / k
        p0 = 1.0 + q0
        p1 = q1
        p2 = q2
        p3 = q3
        p4 = 1.0 + q4
        p5 = q5
    while tl.max(s, axis=0) > 0:  # a count-down (a for loop to the block's max spills its bound at sm_80)
        r0, r1, r2, r3, r4, r5 = _compose(p0, p1, p2, p3, p4, p5, p0, p1, p2, p3, p4, p5)
        more = s > 0
        p0 = tl.where(more, r0, p0)
        p1 = tl.where(more, r1, p1)
        p2 = tl.where(more, r2, p2)
        p3 = tl.where(more, r3, p3)
        p4 = tl.where(more, r4, p4)
        p5 = tl.where(more, r5, p5)
        s = s - 1
    return p0, p1, p2, p3, p4, p5


@triton.jit
def _expm_adjoint(x0, x1, x2, x3, x4, x5, g0, g1, g2, g3, g4, g5):
    """The gradient w.r.t. X (2 x 3, float64) of <G, expm([[X], [0 0 0]])> for G (2 x 3; the last row's
    gradient is irrelevant, it is constant): the first two rows of L(X^T, G) = L(X, G^T)^T, from the
    upper-right block of expm([[X, E], [0, X]]) with E = G^T, whose columns 0 and 1 suffice
    (Q = L(X, E)[:, :2], 3 x 2), by `_expm`'s scaling, Taylor polynomial and squarings. Returns dX (6)."""
    s, factor = _scaling(x0, x1, x2, x3, x4, x5)
    x0 = x0 / factor
    x1 = x1 / factor
    x2 = x2 / factor
    x3 = x3 / factor
    x4 = x4 / factor
    x5 = x5 / factor
    # E[j, i] = G[i, j] / 2**s (the block matrix is scaled as a whole); E's last column is 0.
    e00 = g0 / factor
    e01 = g3 / factor
    e10 = g1 / factor
    e11 = g4 / factor
    e20 = g2 / factor
    e21 = g5 / factor
    p0 = 1.0 + x0 / _DEGREE
    p1 = x1 / _DEGREE
    p2 = x2 / _DEGREE
    p3 = x3 / _DEGREE
    p4 = 1.0 + x4 / _DEGREE
    p5 = x5 / _DEGREE
    q00 = e00 / _DEGREE
    q01 = e01 / _DEGREE
    q10 = e10 / _DEGREE
    q11 = e11 / _DEGREE
    q20 = e20 / _DEGREE
    q21 = e21 / _DEGREE
    for k in tl.static_range(_DEGREE - 1, 0, -1):
        # (P, Q) = (I + X P / k, (X Q + E P) / k), Q on columns 0, 1; P = [p0 p1 p2; p3 p4 p5; 0 0 1]
        r00 = (x0 * q00 + x1 * q10 + x2 * q20 + (e00 * p0 + e01 * p3)) / k
        r01 = (x0 * q01 + x1 * q11 + x2 * q21 + (e00 * p1 + e01 * p4)) / k
        r10 = (x3 * q00 + x4 * q10 + x5 * q20 + (e10 * p0 + e11 * p3)) / k
        r11 = (x3 * q01 + x4 * q11 + x5 * q21 + (e10 * p1 + e11 * p4)) / k
        r20 = (e20 * p0 + e21 * p3) / k
        r21 = (e20 * p1 + e21 * p4) / k
        s0 = (x0 * p0 + x1 * p3) / k
        s1 = (x0 * p1 + x1 * p4) / k
        s2 = (x0 * p2 + x1 * p5 + x2) / k
        s3 = (x3 * p0 + x4 * p3) / k
        s4 = (x3 * p1 + x4 * p4) / k
        s5 = (x3 * p2 + x4 * p5 + x5) / k
        p0 = 1.0 + s0
        p1 = s1
        p2 = s2
        p3 = s3
        p4 = 1.0 + s4
        p5 = s5
        q00 = r00
        q01 = r01
        q10 = r10
        q11 = r11
        q20 = r20
        q21 = r21
    while tl.max(s, axis=0) > 0:
        # (P, Q) = (P P, P Q + Q P) on columns 0, 1 (P[2, :2] = 0, P[2, 2] = 1)
        more = s > 0
        r00 = p0 * q00 + p1 * q10 + p2 * q20 + (q00 * p0 + q01 * p3)
        r01 = p0 * q01 + p1 * q11 + p2 * q21 + (q00 * p1 + q01 * p4)
        r10 = p3 * q00 + p4 * q10 + p5 * q20 + (q10 * p0 + q11 * p3)
        r11 = p3 * q01 + p4 * q11 + p5 * q21 + (q10 * p1 + q11 * p4)
        r20 = q20 + (q20 * p0 + q21 * p3)
        r21 = q21 + (q20 * p1 + q21 * p4)
        q00 = tl.where(more, r00, q00)
        q01 = tl.where(more, r01, q01)
        q10 = tl.where(more, r10, q10)
        q11 = tl.where(more, r11, q11)
        q20 = tl.where(more, r20, q20)
        q21 = tl.where(more, r21, q21)
        c0, c1, c2, c3, c4, c5 = _compose(p0, p1, p2, p3, p4, p5, p0, p1, p2, p3, p4, p5)
        p0 = tl.where(more, c0, p0)
        p1 = tl.where(more, c1, p1)
        p2 = tl.where(more, c2, p2)
        p3 = tl.where(more, c3, p3)
        p4 = tl.where(more, c4, p4)
        p5 = tl.where(more, c5, p5)
        s = s - 1
    # dX[i, j] = Q[j, i]
    return q00, q10, q20, q01, q11, q21


@triton.jit
def _square_adjoint(p0, p1, p2, p3, p4, p5, g0, g1, g2, g3, g4, g5):
    """Gradient w.r.t. P (2 x 3 homogeneous) of <G, P P>: G P^T + P^T G on the first two rows."""
    # (G P^T)[i, j] = sum_m G[i, m] P[j, m], P's last row [0 0 1]
    a0 = g0 * p0 + g1 * p1 + g2 * p2
    a1 = g0 * p3 + g1 * p4 + g2 * p5
    a2 = g2
    a3 = g3 * p0 + g4 * p1 + g5 * p2
    a4 = g3 * p3 + g4 * p4 + g5 * p5
    a5 = g5
    # (P^T G)[i, j] = sum_{m < 2} P[m, i] G[m, j]
    b0 = p0 * g0 + p3 * g3
    b1 = p0 * g1 + p3 * g4
    b2 = p0 * g2 + p3 * g5
    b3 = p1 * g0 + p4 * g3
    b4 = p1 * g1 + p4 * g4
    b5 = p1 * g2 + p4 * g5
    return a0 + b0, a1 + b1, a2 + b2, a3 + b3, a4 + b4, a5 + b5


@triton.jit
def _load6(ptr, at, mask):
    v0 = tl.load(ptr + at, mask=mask, other=0.0)
    v1 = tl.load(ptr + at + 1, mask=mask, other=0.0)
    v2 = tl.load(ptr + at + 2, mask=mask, other=0.0)
    v3 = tl.load(ptr + at + 3, mask=mask, other=0.0)
    v4 = tl.load(ptr + at + 4, mask=mask, other=0.0)
    v5 = tl.load(ptr + at + 5, mask=mask, other=0.0)
    return v0, v1, v2, v3, v4, v5


@triton.jit
def _store6(ptr, at, mask, v0, v1, v2, v3, v4, v5):
    tl.store(ptr + at, v0, mask=mask)
    tl.store(ptr + at + 1, v1, mask=mask)
    tl.store(ptr + at + 2, v2, mask=mask)
    tl.store(ptr + at + 3, v3, mask=mask)
    tl.store(ptr + at + 4, v4, mask=mask)
    tl.store(ptr + at + 5, v5, mask=mask)


@triton.jit
def _f64(v0, v1, v2, v3, v4, v5):
    return (v0.to(tl.float64), v1.to(tl.float64), v2.to(tl.float64), v3.to(tl.float64), v4.to(tl.float64),
            v5.to(tl.float64))


@triton.jit(do_not_specialize=["step", "sumsq_slot"])
def _cells_kernel(theta_ptr, basis_ptr, basis_t_ptr, affines_ptr, table_ptr, grad_ptr, ga_ptr, out_ptr,
                  m_ptr, v_ptr, sumsq_ptr, hyper_ptr, steps_ptr, delta_ptr,
                  d, n_cells, total_ticks, rows_per_b, row_stride, out_stride, step, sumsq_slot, refine, loss,
                  BACKWARD: tl.constexpr, UPDATE: tl.constexpr, FORWARD: tl.constexpr,
                  BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_J: tl.constexpr):
    """Per-cell work of gradient row r = program_id (transform b = r // rows_per_b).

    BACKWARD: gradient row grad[r] (nC, refine + 2, 6) -> dA (float64 scratch ga[r], 6 nC: back through the
    level squarings with the table's values, then through expm) -> d theta = basis^T dA (lanes over
    theta coordinates); the consumed gradient entries are zeroed.
    UPDATE: WRITE stores d theta into out[r * out_stride + k]; ADAM applies one torch.optim.Adam step to
    theta[b] with state m, v (hyper = [beta1, beta2, eps, theta_init, 1 - beta1, 1 - beta2], float64;
    steps[step] = [lr / (1 - beta1**t), sqrt(1 - beta2**t)]), the gradient scaled by 1 / sqrt(sumsq) for
    loss 0 (the batch-wide norm); program 0 zeroes the other sumsq slot for the next iteration.
    ADAM_INIT sets theta = theta_init, m = v = 0 and zeroes sumsq. CANDIDATE writes
    out = theta + delta where finite, else theta.
    FORWARD: affines[b] = basis theta' (theta' the updated theta, or out for CANDIDATE), rounded to the
    dtype, and the flow table[b] from them (float64, cast to the dtype).
    """
    r = tl.program_id(0)
    b = r // rows_per_b
    cells = tl.arange(0, BLOCK_C)
    cmask = cells < n_cells
    ks = tl.arange(0, BLOCK_D)
    kmask = ks < d
    js = tl.arange(0, BLOCK_J)
    jmask = js < 6 * n_cells
    dtype = theta_ptr.dtype.element_ty
    ticks = total_ticks.to(tl.float64)  # level 0 is expm(A / ticks)
    if BACKWARD:
        a0, a1, a2, a3, a4, a5 = _f64(*_load6(affines_ptr, (b * n_cells + cells) * 6, cmask))
        base = r * row_stride + cells * ((refine + 2) * 6)
        zero = tl.zeros([BLOCK_C], dtype=grad_ptr.dtype.element_ty)
        g0, g1, g2, g3, g4, g5 = _f64(*_load6(grad_ptr, base + refine * 6, cmask))
        _store6(grad_ptr, base + refine * 6, cmask, zero, zero, zero, zero, zero, zero)
        entry = (b * n_cells + cells) * ((refine + 1) * 6)
        for i in range(0, refine):
            lv = refine - 1 - i
            # table[lv + 1] = table[lv]^2, with the table's values
            s0, s1, s2, s3, s4, s5 = _f64(*_load6(table_ptr, entry + lv * 6, cmask))
            g0, g1, g2, g3, g4, g5 = _square_adjoint(s0, s1, s2, s3, s4, s5, g0, g1, g2, g3, g4, g5)
            h0, h1, h2, h3, h4, h5 = _f64(*_load6(grad_ptr, base + lv * 6, cmask))
            _store6(grad_ptr, base + lv * 6, cmask, zero, zero, zero, zero, zero, zero)
            g0 = g0 + h0
            g1 = g1 + h1
            g2 = g2 + h2
            g3 = g3 + h3
            g4 = g4 + h4
            g5 = g5 + h5
        # through expm at X = A / ticks: dA = dX / ticks, rounded to the dtype (the reference's cast), plus
        # the affines' own gradient (crossing corrections)
        q0, q1, q2, q3, q4, q5 = _expm_adjoint(a0 / ticks, a1 / ticks, a2 / ticks, a3 / ticks, a4 / ticks,
                                               a5 / ticks, g0, g1, g2, g3, g4, g5)
        h0, h1, h2, h3, h4, h5 = _f64(*_load6(grad_ptr, base + (refine + 1) * 6, cmask))
        _store6(grad_ptr, base + (refine + 1) * 6, cmask, zero, zero, zero, zero, zero, zero)
        _store6(ga_ptr, r * (6 * n_cells) + cells * 6, cmask,
                (q0 / ticks).to(dtype).to(tl.float64) + h0, (q1 / ticks).to(dtype).to(tl.float64) + h1,
                (q2 / ticks).to(dtype).to(tl.float64) + h2, (q3 / ticks).to(dtype).to(tl.float64) + h3,
                (q4 / ticks).to(dtype).to(tl.float64) + h4, (q5 / ticks).to(dtype).to(tl.float64) + h5)
        tl.debug_barrier()
        # d theta = basis^T dA: tiles of CHUNK basis rows, each reduced over its rows
        gsum = tl.zeros([BLOCK_D], dtype=tl.float64)
        rows = tl.arange(0, _CHUNK)
        for j0 in range(0, 6 * n_cells, _CHUNK):
            jj = j0 + rows
            jok = jj < 6 * n_cells
            tile = tl.load(basis_ptr + jj[:, None] * d + ks[None, :], mask=jok[:, None] & kmask[None, :], other=0.0)
            dA = tl.load(ga_ptr + r * (6 * n_cells) + jj, mask=jok, other=0.0)
            gsum += tl.sum(tile.to(tl.float64) * dA[:, None], axis=0)
        gtheta = gsum.to(dtype)
        if UPDATE == 1:
            tl.store(out_ptr + r * out_stride + ks, gtheta, mask=kmask)
        if UPDATE == 2:
            if loss == 0:
                sumsq = tl.load(sumsq_ptr + sumsq_slot)
                scale = tl.where(sumsq > 0.0, 1.0 / tl.sqrt(tl.maximum(sumsq, 1e-300)), 0.0)
                gtheta = (gtheta.to(tl.float64) * scale).to(dtype)
            beta2 = tl.load(hyper_ptr + 1).to(dtype)
            eps = tl.load(hyper_ptr + 2).to(dtype)
            one_minus_beta1 = tl.load(hyper_ptr + 4).to(dtype)
            one_minus_beta2 = tl.load(hyper_ptr + 5).to(dtype)
            step_size = tl.load(steps_ptr + 2 * step).to(dtype)
            bc2_sqrt = tl.load(steps_ptr + 2 * step + 1).to(dtype)
            at = b * d + ks
            m = tl.load(m_ptr + at, mask=kmask, other=0.0)
            v = tl.load(v_ptr + at, mask=kmask, other=0.0)
            theta = tl.load(theta_ptr + at, mask=kmask, other=0.0)
            # torch.optim.Adam (single tensor, not capturable): exp_avg.lerp_(g, 1 - beta1),
            # exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2),
            # denom = exp_avg_sq.sqrt() / bias_correction2_sqrt + eps, param.addcdiv_(exp_avg, denom, -step_size)
            m = m + one_minus_beta1 * (gtheta - m)
            v = v * beta2 + one_minus_beta2 * gtheta * gtheta
            denom = _div(_sqrt(v), bc2_sqrt) + eps
            theta = theta + _div(-step_size * m, denom)
            tl.store(m_ptr + at, m, mask=kmask)
            tl.store(v_ptr + at, v, mask=kmask)
            tl.store(theta_ptr + at, theta, mask=kmask)
            if loss == 0:
                if r == 0:
                    tl.store(sumsq_ptr + 1 - sumsq_slot, 0.0)
    if UPDATE == 4:
        at = b * d + ks
        init = tl.load(hyper_ptr + 3).to(dtype)
        tl.store(theta_ptr + at, tl.zeros([BLOCK_D], dtype=dtype) + init, mask=kmask)
        tl.store(m_ptr + at, tl.zeros([BLOCK_D], dtype=dtype), mask=kmask)
        tl.store(v_ptr + at, tl.zeros([BLOCK_D], dtype=dtype), mask=kmask)
        if r == 0:
            tl.store(sumsq_ptr, 0.0)
            tl.store(sumsq_ptr + 1, 0.0)
    src = theta_ptr
    if UPDATE == 3:
        at = b * d + ks
        theta = tl.load(theta_ptr + at, mask=kmask, other=0.0)
        candidate = theta + tl.load(delta_ptr + at, mask=kmask, other=0.0)
        candidate = tl.where(tl.abs(candidate) < float("inf"), candidate, theta)
        tl.store(out_ptr + at, candidate, mask=kmask)
        src = out_ptr
    if FORWARD:
        tl.debug_barrier()
        # A = basis theta': tiles of CHUNK basis^T rows (theta coordinates), each reduced over its rows
        asum = tl.zeros([BLOCK_J], dtype=tl.float64)
        rows = tl.arange(0, _CHUNK)
        for k0 in range(0, d, _CHUNK):
            kk = k0 + rows
            kok = kk < d
            tile = tl.load(basis_t_ptr + kk[:, None] * (6 * n_cells) + js[None, :], mask=kok[:, None] & jmask[None, :],
                           other=0.0)
            t = tl.load(src + b * d + kk, mask=kok, other=0.0).to(tl.float64)
            asum += tl.sum(tile.to(tl.float64) * t[:, None], axis=0)
        tl.store(affines_ptr + b * (6 * n_cells) + js, asum.to(dtype), mask=jmask)
        tl.debug_barrier()
        a0, a1, a2, a3, a4, a5 = _f64(*_load6(affines_ptr, (b * n_cells + cells) * 6, cmask))
        p0, p1, p2, p3, p4, p5 = _expm(a0 / ticks, a1 / ticks, a2 / ticks, a3 / ticks, a4 / ticks, a5 / ticks)
        entry = (b * n_cells + cells) * ((refine + 1) * 6)
        _store6(table_ptr, entry, cmask, p0.to(dtype), p1.to(dtype), p2.to(dtype), p3.to(dtype), p4.to(dtype),
                p5.to(dtype))
        for lv in range(1, refine + 1):
            p0, p1, p2, p3, p4, p5 = _compose(p0, p1, p2, p3, p4, p5, p0, p1, p2, p3, p4, p5)
            _store6(table_ptr, entry + lv * 6, cmask, p0.to(dtype), p1.to(dtype), p2.to(dtype), p3.to(dtype),
                    p4.to(dtype), p5.to(dtype))


@triton.jit(do_not_specialize=["slot"])
def _lm_kernel(normal_ptr, state_ptr, theta_ptr, candidate_ptr, objective_ptr, mu_ptr, scale_ptr,
               system_ptr, rhs_ptr, hyper_ptr, n_batch, d, slot,
               MODE: tl.constexpr, BLOCK_D: tl.constexpr):
    """Levenberg-Marquardt bookkeeping of `cpab.fit.fit_gauss_newton` for transform b = program_id.

    normal (B, d + 1, d + 1) = [J | r]^T [J | r] at the candidate; state: the same at the current theta.
    START (theta = 0, the closed-form start): state = normal, theta = 0; system = J^T J + damping I,
    rhs = -J^T r. ACCEPT: theta = candidate, state = normal, objective = |r|^2 + damping |theta|^2, mu = 0.
    STEP: objective at the candidate; better = it is lower; scale = mean diag(J^T J) of the current state,
    mu = better ? mu / 3 : max(10 mu, 1e-3 scale), at most 1e6 max_b scale (scale[slot] holds every
    transform's current scale; scale[1 - slot] receives the next); better: theta, state, objective
    = the candidate's. Then the next system (J^T J + (damping + mu) I) delta = -(J^T r + damping theta).
    hyper = [damping, 1e-3] (float64: the reference's constants exactly).
    """
    b = tl.program_id(0)
    ks = tl.arange(0, BLOCK_D)
    kmask = ks < d
    dtype = theta_ptr.dtype.element_ty
    n1 = d + 1
    lam = tl.load(hyper_ptr).to(dtype)
    at = b * d + ks
    base = b * n1 * n1
    candidate = tl.load(candidate_ptr + at, mask=kmask, other=0.0)
    theta = tl.load(theta_ptr + at, mask=kmask, other=0.0)
    mu = lam * 0.0
    if MODE == 0:
        theta = tl.zeros([BLOCK_D], dtype=dtype)
    if MODE == 1:
        theta = candidate
        tl.store(objective_ptr + b, tl.load(normal_ptr + base + n1 * n1 - 1) + lam * tl.sum(theta * theta, axis=0))
    if MODE == 2:
        new_objective = tl.load(normal_ptr + base + n1 * n1 - 1) + lam * tl.sum(candidate * candidate, axis=0)
        objective = tl.load(objective_ptr + b)
        mu = tl.load(mu_ptr + b)
        better = new_objective < objective
        diag = tl.load(state_ptr + base + ks * (n1 + 1), mask=kmask, other=0.0)
        scale = _div(tl.sum(diag, axis=0), d)
        top = tl.zeros([BLOCK_D], dtype=dtype)
        for start in range(0, n_batch, BLOCK_D):
            top = tl.maximum(top, tl.load(scale_ptr + slot * n_batch + start + ks, mask=start + ks < n_batch,
                                          other=0.0))
        top = tl.max(top, axis=0)
        mu = tl.where(better, _div(mu, 3.0), tl.maximum(10.0 * mu, tl.load(hyper_ptr + 1).to(dtype) * scale))
        mu = tl.minimum(mu, 1e6 * top)
        theta = tl.where(better, candidate, theta)
        tl.store(objective_ptr + b, tl.where(better, new_objective, objective))
    tl.store(theta_ptr + at, theta, mask=kmask)
    tl.store(mu_ptr + b, mu)
    shift = lam + mu
    for i in range(0, n1):
        row = tl.load(normal_ptr + base + i * n1 + ks, mask=ks < n1, other=0.0)
        if MODE == 2:
            row = tl.where(better, row, tl.load(state_ptr + base + i * n1 + ks, mask=ks < n1, other=0.0))
        tl.store(state_ptr + base + i * n1 + ks, row, mask=ks < n1)
        if i < d:
            tl.store(system_ptr + (b * d + i) * d + ks, row + tl.where(ks == i, shift, 0.0), mask=kmask)
    tl.debug_barrier()
    column = tl.load(state_ptr + base + ks * n1 + d, mask=kmask, other=0.0)
    diag = tl.load(state_ptr + base + ks * (n1 + 1), mask=kmask, other=0.0)
    if MODE == 0:
        tl.store(rhs_ptr + at, -column, mask=kmask)
    else:
        tl.store(rhs_ptr + at, -(column + lam * theta), mask=kmask)
        tl.store(scale_ptr + (1 - slot) * n_batch + b, _div(tl.sum(diag, axis=0), d))
