"""GPU fast path of `cpab.integrate.integrate_table`: one fused Triton kernel, forward and backward.

Conventions are those of `cpab.integrate` (domain [-1, 1]^2, points (B, N, 2) in (x, y) order, flow
table (B, nC, refine + 1, 2, 3) of `flow_table`, the same stepping rule). The kernel makes the same
decisions as the reference with the same float operations in the same order (fp contraction into
FMAs is switched off), so on one device both give the same steps; the reference stays the source of
truth and the tests compare the two.

Kernel: one program per block of `BLOCK` points; every point keeps its state (position, cell, tick,
level, bracket end, crossings) in registers and loops over its steps with a per-lane `active` mask,
gathering the 6 table entries of its (cell, level) from global memory. No host synchronisation: the
loop ends when the block's last point is done.

Backward (chosen design: no path storage, two sweeps). An accepted step is the affine map
x_{k+1} = E_k [x_k; 1] with linear part L_k = E_k[:, :2], so for a loss with g = dL/dx_K:
    lambda_K = g,  lambda_k = L_k^T lambda_{k+1},  dL/dE_k = lambda_{k+1} [x_k; 1]^T.
Storing the path (tens of steps per point, millions of points for dense grids) costs too much
memory, and retracing it backwards with the inverse maps would need the step decisions stored too
(recomputing them from inverted positions is not bit-exact). Instead:
  1. the forward sweep also accumulates the 2 x 2 Jacobian J = L_K ... L_1 of each point (4 extra
     registers), so dL/dx_0 = lambda_0 = J^T g needs no second sweep;
  2. for the table gradient a second forward sweep recomputes exactly the same steps and carries
     lambda forwards, lambda_{k+1} = L_k^{-T} lambda_k (L_k is the expm of a small matrix, det > 0,
     well conditioned), adding lambda_{k+1} [x_k; 1]^T into the table gradient. A point stays on the
     same (cell, level) entry for runs of steps, so each lane sums a run in registers and flushes it
     with `tl.atomic_add` only when its entry changes (and at the end).
Gradients w.r.t. theta then follow by autograd through the flow table (and the affines), as in the reference.

Dispatch (`integrate`, `integrate_table`): backend "auto" uses the kernel for CUDA tensors when
Triton is importable and the reference otherwise; "triton" forces the kernel (on CPU tensors it runs
through the Triton interpreter: exact but slow, for tests), "reference" forces the reference.
"""
from __future__ import annotations  # kernel annotations stay strings until Triton reads them

import importlib.util
import os
import sys
import warnings

import torch

from .integrate import cell_index, flow_table
from .integrate import integrate_table as reference_integrate_table

triton = None  # imported on first use of the kernel (see `_kernel`), so `import cpab` never imports Triton
tl = None
HAS_TRITON = importlib.util.find_spec("triton") is not None
BACKENDS = ("auto", "reference", "triton")
BLOCK = 128
_MODE_FORWARD, _MODE_JACOBIAN, _MODE_ADJOINT = 0, 1, 2



def _cell_index(y0, y1, nx, half_nx, half_ny, max_i, max_j):
    """`cpab.integrate.cell_index` per lane, operation by operation (int32 cell numbers)."""
    u = (y0 + 1.0) * half_nx
    w = (y1 + 1.0) * half_ny
    fi = tl.minimum(tl.maximum(tl.floor(u), 0.0), max_i)
    fj = tl.minimum(tl.maximum(tl.floor(w), 0.0), max_j)
    p = 2.0 * (u - fi) - 1.0
    q = 2.0 * (w - fj) - 1.0
    a_pos = (p + q) >= 0.0
    b_pos = (p - q) >= 0.0
    tri = tl.where(a_pos, tl.where(b_pos, 1, 2), tl.where(b_pos, 0, 3))
    return 4 * (fj.to(tl.int32) * nx + fi.to(tl.int32)) + tri


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
    ratio = num / den
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


def _correction_vjp(w0, w1, x0, x1, z0, z1, o0, o1, o3, o4, n0, n1, n3, n4, dur,
                    ratio, den, tau, h, c0, c1, vo0, vo1, lo0, lo1, vn0, vn1, ln0, ln1, f0, f1, d00, d01, num):
    """Vector-Jacobian product of `_correction` for the cotangent w of its output: returns the
    gradients w.r.t. x (2), x_end z (2), A_old (6) and A_new (6), in that order."""
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
    gnum = gratio / den
    gden = -gratio * num / (den * den)
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

def _integrate_kernel(points_ptr, cells_ptr, table_ptr, affines_ptr, out_ptr, jac_ptr, lam_ptr,
                      grad_table_ptr, grad_affines_ptr,
                      n_points, points_per_batch, n_cells, nx, ny, half_nx, half_ny, max_i, max_j,
                      total_ticks, max_crossings, eps,
                      REFINE: tl.constexpr, MODE: tl.constexpr, BLOCK: tl.constexpr):
    """Steps points (M, 2) from their cells (M,) through the table (B * nC * (REFINE + 1), 6) and the
    affines (B * nC, 6) (for the crossing correction).

    MODE 0 writes out (M, 2); MODE 1 also jac (M, 4) = [J00, J01, J10, J11] of x_K w.r.t. x_0;
    MODE 2 reads lam (M, 2) = dL/dx_0 and adds dL/dtable and dL/daffines into grad_table, grad_affines.
    """
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n_points
    x0 = tl.load(points_ptr + 2 * offs, mask=valid, other=0.0)
    x1 = tl.load(points_ptr + 2 * offs + 1, mask=valid, other=0.0)
    cell = tl.load(cells_ptr + offs, mask=valid, other=0)
    row = (offs // points_per_batch) * n_cells
    tick = tl.zeros([BLOCK], dtype=tl.int32)
    level = tick + REFINE
    bracket = tick - 1
    crossings = tick
    if MODE == 1:
        j00 = x0 * 0.0 + 1.0
        j01 = x0 * 0.0
        j10 = x0 * 0.0
        j11 = x0 * 0.0 + 1.0
    if MODE == 2:
        lam0 = tl.load(lam_ptr + 2 * offs, mask=valid, other=0.0)
        lam1 = tl.load(lam_ptr + 2 * offs + 1, mask=valid, other=0.0)
        run_key = tick - 1
        acc0 = x0 * 0.0
        acc1 = x0 * 0.0
        acc2 = x0 * 0.0
        acc3 = x0 * 0.0
        acc4 = x0 * 0.0
        acc5 = x0 * 0.0
    active = valid & (tick < total_ticks)
    while tl.max(active.to(tl.int32), axis=0) > 0:
        key = (row + cell) * (REFINE + 1) + level
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
        old_base = 6 * (row + cell)
        new_base = 6 * (row + new_cell)
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
        dur = (1 << level).to(x0.dtype) / total_ticks
        (k0, k1, ratio, den, tau, h, c0, c1, vo0, vo1, lo0, lo1, vn0, vn1, ln0, ln1, f0, f1, d00, d01,
         num) = _correction(x0, x1, y0, y1, o0, o1, o2, o3, o4, o5, n0, n1, n2, n3, n4, n5, dur, eps)
        if MODE != 0:
            (rx0, rx1, rz0, rz1, ro0, ro1, ro2, ro3, ro4, ro5, rn0, rn1, rn2, rn3, rn4, rn5) = _correction_vjp(
                x0 * 0.0 + 1.0, x0 * 0.0, x0, x1, y0, y1, o0, o1, o3, o4, n0, n1, n3, n4, dur,
                ratio, den, tau, h, c0, c1, vo0, vo1, lo0, lo1, vn0, vn1, ln0, ln1, f0, f1, d00, d01, num)
            (sx0, sx1, sz0, sz1, so0, so1, so2, so3, so4, so5, sn0, sn1, sn2, sn3, sn4, sn5) = _correction_vjp(
                x0 * 0.0, x0 * 0.0 + 1.0, x0, x1, y0, y1, o0, o1, o3, o4, n0, n1, n3, n4, dur,
                ratio, den, tau, h, c0, c1, vo0, vo1, lo0, lo1, vn0, vn1, ln0, ln1, f0, f1, d00, d01, num)
            # step Jacobian M = d x_{k+1} / d x_k: the linear part L of E, or through the correction
            m00 = tl.where(crossed, rx0 + rz0 * e0 + rz1 * e3, e0)
            m01 = tl.where(crossed, rx1 + rz0 * e1 + rz1 * e4, e1)
            m10 = tl.where(crossed, sx0 + sz0 * e0 + sz1 * e3, e3)
            m11 = tl.where(crossed, sx1 + sz0 * e1 + sz1 * e4, e4)
        if MODE == 1:
            n00 = m00 * j00 + m01 * j10
            n01 = m00 * j01 + m01 * j11
            n10 = m10 * j00 + m11 * j10
            n11 = m10 * j01 + m11 * j11
            j00 = tl.where(accept, n00, j00)
            j01 = tl.where(accept, n01, j01)
            j10 = tl.where(accept, n10, j10)
            j11 = tl.where(accept, n11, j11)
        if MODE == 2:
            # lambda_{k+1} = M^{-T} lambda_k
            det = m00 * m11 - m01 * m10
            w0 = (m11 * lam0 - m10 * lam1) / det
            w1 = (m00 * lam1 - m01 * lam0) / det
            # cotangent of E [x; 1]: lambda_{k+1} itself, or through the correction
            gz0 = tl.where(crossed, w0 * rz0 + w1 * sz0, w0)
            gz1 = tl.where(crossed, w0 * rz1 + w1 * sz1, w1)
            tl.atomic_add(grad_affines_ptr + old_base, w0 * ro0 + w1 * so0, mask=crossed)
            tl.atomic_add(grad_affines_ptr + old_base + 1, w0 * ro1 + w1 * so1, mask=crossed)
            tl.atomic_add(grad_affines_ptr + old_base + 2, w0 * ro2 + w1 * so2, mask=crossed)
            tl.atomic_add(grad_affines_ptr + old_base + 3, w0 * ro3 + w1 * so3, mask=crossed)
            tl.atomic_add(grad_affines_ptr + old_base + 4, w0 * ro4 + w1 * so4, mask=crossed)
            tl.atomic_add(grad_affines_ptr + old_base + 5, w0 * ro5 + w1 * so5, mask=crossed)
            tl.atomic_add(grad_affines_ptr + new_base, w0 * rn0 + w1 * sn0, mask=crossed)
            tl.atomic_add(grad_affines_ptr + new_base + 1, w0 * rn1 + w1 * sn1, mask=crossed)
            tl.atomic_add(grad_affines_ptr + new_base + 2, w0 * rn2 + w1 * sn2, mask=crossed)
            tl.atomic_add(grad_affines_ptr + new_base + 3, w0 * rn3 + w1 * sn3, mask=crossed)
            tl.atomic_add(grad_affines_ptr + new_base + 4, w0 * rn4 + w1 * sn4, mask=crossed)
            tl.atomic_add(grad_affines_ptr + new_base + 5, w0 * rn5 + w1 * sn5, mask=crossed)
            # dL/dE_k = gz [x_k; 1]^T, summed in registers while the (cell, level) entry stays the same
            flush = accept & (key != run_key) & (run_key >= 0)
            tl.atomic_add(grad_table_ptr + 6 * run_key, acc0, mask=flush)
            tl.atomic_add(grad_table_ptr + 6 * run_key + 1, acc1, mask=flush)
            tl.atomic_add(grad_table_ptr + 6 * run_key + 2, acc2, mask=flush)
            tl.atomic_add(grad_table_ptr + 6 * run_key + 3, acc3, mask=flush)
            tl.atomic_add(grad_table_ptr + 6 * run_key + 4, acc4, mask=flush)
            tl.atomic_add(grad_table_ptr + 6 * run_key + 5, acc5, mask=flush)
            keep = (flush == 0).to(x0.dtype)
            take = accept.to(x0.dtype)
            acc0 = acc0 * keep + take * (gz0 * x0)
            acc1 = acc1 * keep + take * (gz0 * x1)
            acc2 = acc2 * keep + take * gz0
            acc3 = acc3 * keep + take * (gz1 * x0)
            acc4 = acc4 * keep + take * (gz1 * x1)
            acc5 = acc5 * keep + take * gz1
            run_key = tl.where(accept, key, run_key)
            lam0 = tl.where(accept, w0, lam0)
            lam1 = tl.where(accept, w1, lam1)
        y0 = tl.where(crossed, k0, y0)
        y1 = tl.where(crossed, k1, y1)
        new_cell = tl.where(crossed, _cell_index(y0, y1, nx, half_nx, half_ny, max_i, max_j), new_cell)
        bracket = tl.where(reject, tick + (1 << level), bracket)
        x0 = tl.where(accept, y0, x0)
        x1 = tl.where(accept, y1, x1)
        tick = tick + tl.where(accept, 1 << level, 0)
        crossings = crossings + crossed.to(tl.int32)
        cell = tl.where(accept, new_cell, cell)
        bracket = tl.where(crossed | (tick >= bracket), -1, bracket)
        # with no bracket open: the largest level l <= REFINE with 2**l <= remaining ticks (0 if none)
        remaining = total_ticks - tick
        fitting = tl.zeros([BLOCK], dtype=tl.int32)
        for lv in tl.static_range(1, REFINE + 1):
            fitting = tl.where(remaining >= (1 << lv), lv, fitting)
        level = tl.where(bracket >= 0, tl.maximum(level - 1, 0), fitting)
        active = active & (remaining > 0)
    if MODE == 2:
        last = valid & (run_key >= 0)
        tl.atomic_add(grad_table_ptr + 6 * run_key, acc0, mask=last)
        tl.atomic_add(grad_table_ptr + 6 * run_key + 1, acc1, mask=last)
        tl.atomic_add(grad_table_ptr + 6 * run_key + 2, acc2, mask=last)
        tl.atomic_add(grad_table_ptr + 6 * run_key + 3, acc3, mask=last)
        tl.atomic_add(grad_table_ptr + 6 * run_key + 4, acc4, mask=last)
        tl.atomic_add(grad_table_ptr + 6 * run_key + 5, acc5, mask=last)
    else:
        tl.store(out_ptr + 2 * offs, x0, mask=valid)
        tl.store(out_ptr + 2 * offs + 1, x1, mask=valid)
    if MODE == 1:
        tl.store(jac_ptr + 4 * offs, j00, mask=valid)
        tl.store(jac_ptr + 4 * offs + 1, j01, mask=valid)
        tl.store(jac_ptr + 4 * offs + 2, j10, mask=valid)
        tl.store(jac_ptr + 4 * offs + 3, j11, mask=valid)


_HELPERS = ("_cell_index", "_correction", "_correction_vjp")
_SOURCES = {name: globals()[name] for name in _HELPERS + ("_integrate_kernel",)}
_loaded = {}


def _kernel(device):
    """The Triton kernel for tensors on device, importing Triton and jitting the sources on first use.

    CUDA tensors run the compiled kernel. CPU tensors need the Triton interpreter, which Triton fixes
    for the whole process when it is imported: if Triton is not imported yet, TRITON_INTERPRET=1 is set
    first; if it was imported without it, this raises (set TRITON_INTERPRET=1 before anything imports
    triton, e.g. torchvision). In an interpreter process CUDA tensors also run interpreted (slow).
    """
    global triton, tl
    if not HAS_TRITON:
        raise RuntimeError("the 'triton' backend needs the triton package, which is not installed")
    if not _loaded:
        if device.type != "cuda" and "triton" not in sys.modules:
            os.environ["TRITON_INTERPRET"] = "1"
        import triton as triton_module
        import triton.language as triton_language
        triton, tl = triton_module, triton_language
        for name in _HELPERS:  # the kernel resolves its device helpers from this module's globals
            globals()[name] = triton.jit(_SOURCES[name])
        _loaded["kernel"] = triton.jit(_SOURCES["_integrate_kernel"])
        _loaded["interpret"] = bool(triton.knobs.runtime.interpret)
    if device.type != "cuda" and not _loaded["interpret"]:
        raise RuntimeError("the Triton kernel on CPU tensors needs TRITON_INTERPRET=1 set before triton is "
                           "imported (it was imported without it)")
    return _loaded["kernel"]


def interpreter_available():
    """Whether the kernel can run on CPU tensors in this process (Triton installed, interpreter mode)."""
    if not HAS_TRITON:
        return False
    if "triton" not in sys.modules:
        return True
    import triton as triton_module
    return bool(triton_module.knobs.runtime.interpret)


def _launch(mode, points, cells, table, affines, lam, nx, ny, steps, refine, max_crossings):
    """Runs the kernel on contiguous inputs. Modes 0, 1: returns (out (B, N, 2), jac (B * N, 4) or None);
    mode 2: returns (grad_table, grad_affines)."""
    n_points = points.shape[0] * points.shape[1]
    flat_points = points.reshape(n_points, 2)
    out = torch.empty_like(flat_points) if mode != _MODE_ADJOINT else flat_points
    jac = flat_points.new_empty(n_points, 4) if mode == _MODE_JACOBIAN else flat_points
    grad_table = torch.zeros_like(table) if mode == _MODE_ADJOINT else table
    grad_affines = torch.zeros_like(affines) if mode == _MODE_ADJOINT else affines
    lam = lam if lam is not None else flat_points
    if n_points > 0:
        kernel = _kernel(points.device)
        grid = ((n_points + BLOCK - 1) // BLOCK,)
        kernel[grid](
            flat_points, cells, table, affines, out, jac, lam, grad_table, grad_affines,
            n_points, points.shape[1], table.shape[1], nx, ny, 0.5 * nx, 0.5 * ny, float(nx - 1), float(ny - 1),
            steps * 2 ** refine, max_crossings, torch.finfo(points.dtype).eps ** 2,
            REFINE=refine, MODE=mode, BLOCK=BLOCK, num_warps=4, enable_fp_fusion=False)
    if mode == _MODE_ADJOINT:
        return grad_table, grad_affines
    return out.view_as(points), (jac if mode == _MODE_JACOBIAN else None)


class _IntegrateTable(torch.autograd.Function):
    """Autograd wrapper of the kernel (first derivatives; see the module docstring for the backward)."""

    @staticmethod
    def forward(ctx, points, table, affines, nx, ny, steps, refine, max_crossings):
        points, table, affines = points.contiguous(), table.contiguous(), affines.contiguous()
        cells = cell_index(points, nx, ny).to(torch.int32).reshape(-1)
        needs_grad = any(ctx.needs_input_grad[:3])
        out, jac = _launch(_MODE_JACOBIAN if needs_grad else _MODE_FORWARD, points, cells, table, affines,
                           None, nx, ny, steps, refine, max_crossings)
        if needs_grad:
            ctx.save_for_backward(points, cells, table, affines, jac)
        ctx.settings = (nx, ny, steps, refine, max_crossings)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        points, cells, table, affines, jac = ctx.saved_tensors
        g = grad_out.reshape(-1, 2).to(points.dtype)
        # lambda_0 = J^T g with J = [[J00, J01], [J10, J11]] stored row-major in jac
        lam = torch.stack([jac[:, 0] * g[:, 0] + jac[:, 2] * g[:, 1],
                           jac[:, 1] * g[:, 0] + jac[:, 3] * g[:, 1]], dim=1).contiguous()
        grad_points = lam.view_as(points) if ctx.needs_input_grad[0] else None
        grad_table = grad_affines = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            grad_table, grad_affines = _launch(_MODE_ADJOINT, points, cells, table, affines, lam, *ctx.settings)
        return grad_points, grad_table, grad_affines, None, None, None, None, None


def triton_integrate_table(points, table, affines, nx, ny, steps, refine, max_crossings):
    """`cpab.integrate.integrate_table` by the Triton kernel (CUDA, or the interpreter for CPU tensors).

    points (B, N, 2), table (B, nC, refine + 1, 2, 3) and affines (B, nC, 2, 3) of one float dtype and
    device; returns (B, N, 2). Differentiable once w.r.t. points, table and affines.
    """
    if points.dtype not in (torch.float32, torch.float64) or table.dtype != points.dtype or affines.dtype != points.dtype:
        raise TypeError(f"points, table and affines must share one dtype, float32 or float64; got "
                        f"{points.dtype}, {table.dtype}, {affines.dtype}")
    if not (points.device == table.device == affines.device):
        raise ValueError(f"points, table and affines must be on one device, got "
                         f"{points.device}, {table.device}, {affines.device}")
    if table.shape[0] != points.shape[0] or table.shape[2] != refine + 1 or affines.shape[:2] != table.shape[:2]:
        raise ValueError(f"table {tuple(table.shape)} / affines {tuple(affines.shape)} do not match "
                         f"B={points.shape[0]}, refine={refine}")
    return _IntegrateTable.apply(points, table, affines, nx, ny, steps, refine, max_crossings)


def resolve_backend(backend, device):
    """The backend ("reference" or "triton") that `backend` ("auto"|"reference"|"triton") means on device."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if (HAS_TRITON and torch.device(device).type == "cuda") else "reference"
    return backend


def integrate_table(points, table, affines, nx, ny, steps, refine, max_crossings, backend="auto"):
    """`cpab.integrate.integrate_table` (same arguments) through the chosen backend."""
    if resolve_backend(backend, points.device) == "triton":
        return triton_integrate_table(points, table, affines, nx, ny, steps, refine, max_crossings)
    return reference_integrate_table(points, table, affines, nx, ny, steps, refine, max_crossings)


def flow_table_sync_free(affines, steps, refine, squarings=8, degree=12):
    """`cpab.integrate.flow_table` with a fixed amount of work, so it never synchronises with the host.

    E[:, c, l] = expm(2**l / T * [[A_c], [0 0 0]])[:2] as in the reference (T = steps * 2**refine),
    computed in float64: a degree-`degree` Taylor polynomial (Horner) of the matrix scaled by
    2**-squarings, squared `squarings` times, then squared once more per level (expm(2X) = expm(X)^2).
    The reference picks its scaling from the data on the host (`torch.linalg.matrix_exp` does too): a
    device sync on CUDA, which also forbids CUDA-graph capture. For CPAB's small in-cell flows the fixed
    scheme agrees with it to float64 rounding (tested). Returns (B, nC, refine + 1, 2, 3) in
    affines.dtype, differentiable.
    """
    B, n_cells = affines.shape[:2]
    hom = torch.cat([affines.to(torch.float64),
                     affines.new_zeros(B, n_cells, 1, 3, dtype=torch.float64)], dim=2)
    scaled = hom / float(steps * 2 ** refine * 2 ** squarings)
    eye = torch.eye(3, dtype=torch.float64, device=affines.device)
    flow = eye + scaled / degree
    for k in range(degree - 1, 0, -1):
        flow = eye + (scaled @ flow) / k
    for _ in range(squarings):
        flow = flow @ flow
    levels = [flow]
    for _ in range(refine):
        levels.append(levels[-1] @ levels[-1])
    return torch.stack(levels, dim=2)[..., :2, :].to(affines.dtype)


def integrate(points, affines, nx, ny, steps, refine, max_crossings, backend="auto"):
    """`cpab.integrate.integrate` (flow at time 1 of points (B, N, 2) under affines (B, nC, 2, 3)) by backend.

    The "triton" backend also builds the flow table without host syncs (`flow_table_sync_free`).
    """
    if resolve_backend(backend, points.device) == "triton":
        table = flow_table_sync_free(affines, steps, refine)
        return triton_integrate_table(points, table, affines, nx, ny, steps, refine, max_crossings)
    return reference_integrate_table(points, flow_table(affines, steps, refine), affines, nx, ny, steps, refine,
                                     max_crossings)


def transform_jacobian(model, points, theta):
    """Points moved by theta and the exact Jacobian d transform / d theta, with no host synchronisation.

    model: a `cpab.CPAB`; points (B, N, 2), theta (B, d) -> (out (B, N, 2), jac (B, N, 2, d)), detached.
    Every (transform, point, output coordinate) becomes its own one-point problem, so ONE backward
    pass of the model's integrator (the Triton adjoint kernel on CUDA) yields all 2 N rows of each
    Jacobian. Exact for the discrete integrator (the same decisions as `transform`), for Gauss-Newton
    fits on the GPU. Cost: 2 B N one-point transforms, their flow tables included.
    """
    B, N = points.shape[:2]
    with torch.enable_grad():
        single = points.detach().reshape(B * N, 1, 1, 2).expand(B * N, 2, 1, 2).reshape(2 * B * N, 1, 2)
        thetas = theta.detach().repeat_interleave(2 * N, dim=0).requires_grad_(True)
        out = model.transform_unchecked(single, thetas).reshape(B * N, 2, 2)
        (grad,) = torch.autograd.grad(out.diagonal(dim1=1, dim2=2).sum(), thetas)
    return out.detach()[:, 0].reshape(B, N, 2), grad.reshape(B, N, 2, theta.shape[1])


def _adam_iteration(model, x, y, theta, optimizer):
    """One iteration of the faithful Adam fit (the loss of `cpab.fit.fit_adam`), no host sync."""
    from .fit import official_loss  # here, not at the top: cpab.fit imports this module

    loss = official_loss(model.transform_unchecked(x, theta) - y)
    (grad,) = torch.autograd.grad(loss, theta)
    theta.grad.copy_(grad)
    optimizer.step()


def adam_fit_cuda_graph(model, x, y, iterations, lr, theta_init):
    """`cpab.fit.fit_adam` (same start, loss and torch.optim.Adam updates) replayed from one CUDA graph.

    x, y (B, N, 2) keypoints, returns theta (B, d) detached. On CUDA one iteration (forward through
    the Triton kernel, its adjoint, the Adam update with capturable=True so that its step counter
    stays on the device) is captured after a warm-up iteration whose effects are then undone, and
    replayed `iterations` times: no host sync and one graph launch per iteration. Elsewhere, or when
    capture fails (RuntimeError, e.g. an op that synchronises), the same iterations run eagerly.
    """
    with torch.inference_mode(False), torch.enable_grad():
        x, y = x.detach().clone(), y.detach().clone()
        start = torch.full((x.shape[0], model.dim), float(theta_init), dtype=x.dtype, device=x.device)
        theta = start.clone().requires_grad_(True)
        theta.grad = torch.zeros_like(theta)
        optimizer = torch.optim.Adam([theta], lr=lr, capturable=x.is_cuda)
        if x.is_cuda and iterations > 0:
            try:
                stream = torch.cuda.Stream(x.device)
                stream.wait_stream(torch.cuda.current_stream(x.device))
                with torch.cuda.stream(stream):
                    _adam_iteration(model, x, y, theta, optimizer)  # warm-up: compiles, creates Adam state
                torch.cuda.current_stream(x.device).wait_stream(stream)
                with torch.no_grad():
                    theta.copy_(start)
                    for state in optimizer.state[theta].values():
                        state.zero_()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    _adam_iteration(model, x, y, theta, optimizer)
            except RuntimeError as error:
                warnings.warn(f"CUDA-graph capture of the Adam fit failed ({error}); running eagerly")
            else:
                for _ in range(iterations):
                    graph.replay()
                return theta.detach().clone()
            with torch.no_grad():
                theta.copy_(start)
            optimizer = torch.optim.Adam([theta], lr=lr, capturable=True)
        for _ in range(iterations):
            _adam_iteration(model, x, y, theta, optimizer)
        return theta.detach()
