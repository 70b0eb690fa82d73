"""`cpab` against libcpab side by side in one run: velocity fields, integrators, the official Adam fit.

    python -m bench.against_libcpab              # all three tables (a few minutes on one CPU thread)
    python -m bench.against_libcpab --quick      # smaller problems, seconds

Needs `libcpab==0.1.3` (PyPI, a maintained pure-PyTorch fork of the libcpab the official CPABMM code
uses; requirements-dev.txt). Its wheel has no C++ sources, so it runs its pure-PyTorch integrator
(`CPAB_transformer_slow`), the same scheme as the official code's C++/CUDA one: 50 steps, each the
exact in-cell flow expm(A_c / 50) of the cell the point is in at the start of the step, float32.
Everything is reported in [-1, 1] units (libcpab's [0, 1] results are mapped by x = 2 u - 1).

1. Velocity: the same theta gives v_cpab(p) = 2 v_libcpab((p + 1) / 2), for both of cpab's bases.
2. Integrators against a float64 RK4 reference (2000 steps on the same field), theta ~ N(0, I),
   16 thetas (2 with --quick) x a 32 x 32 grid on [-1, 1]^2: libcpab's 50-step scheme and cpab's default integrator.
3. The official fit, CPABMM-shaped: K = 10 partial warps (4 x 4, 5 keypoint pairs each, 100 Adam steps)
   and one global warp (6 x 6, all 50 pairs, 150 steps) per sample, keypoints source ~ U(-0.8, 0.8),
   driving = source + 0.1 N(0, 1), theta_0 = 1e-6, Adam lr 1e-2, one Frobenius norm per batch. The
   official procedure runs on libcpab (autograd through its integrator) holding cpab's default basis;
   cpab's `CPAB.fit` on the same keypoints, with each basis; and, where this machine's LAPACK gives
   libcpab another basis, the official fit with that one (the official code's own machine dependence).
   The table gives the distance between the fitted warps on the 64 x 64 grid (max and mean over points).
"""
import argparse
import sys
import time

import torch

from cpab import CPAB
from cpab.basis import null_space_basis
from cpab.integrate import integrate_rk4


def _libcpab(tess, zero_boundary=False):
    """(libcpab's Cpab holding cpab's libcpab basis, its pure-PyTorch integrator, libcpab's own basis here).

    libcpab computes its basis with this machine's LAPACK, whose null vectors depend on the CPU kernels
    and thread count (see `cpab.make_bases`); cpab's shipped bases are libcpab's under the reference
    setup. Giving libcpab cpab's basis compares the rest exactly; `own` shows the machine's effect.
    """
    try:
        import libcpab
        from libcpab.transformer import CPAB_transformer_slow
    except ImportError as error:
        raise SystemExit(f"error: needs libcpab==0.1.3 (pip install -r requirements-dev.txt): {error}") from error
    T = libcpab.Cpab(list(tess), zero_boundary=zero_boundary, volume_perservation=False, override=True)
    own = T.params.basis
    T.params.basis = null_space_basis(tess[0], tess[1], zero_boundary).copy()
    return T, CPAB_transformer_slow, own


def _lib_transform(T, slow, points, theta):
    """libcpab's integrator on points (B, N, 2) in [-1, 1], float32 theta (B, d): (B, N, 2) in [-1, 1]."""
    grid01 = ((points + 1) / 2).permute(0, 2, 1).contiguous()
    return (2 * slow(grid01, theta, T.params) - 1).permute(0, 2, 1)


def rk4(model, points, theta, n_steps=2000):
    """Float64 classical RK4 on the field of theta (the reference: `cpab.integrate.integrate_rk4`)."""
    return integrate_rk4(points, model.cell_affines(theta), model.nx, model.ny, n_steps)


def velocity_table(sizes, generator):
    print("1. velocity: max |v_cpab(p) - 2 v_libcpab((p + 1) / 2)|, theta ~ N(0, I), p in [-1.5, 1.5]^2;")
    print("   libcpab holding cpab's default basis (its own basis on this machine: last column)")
    for tess in sizes:
        T, _, own = _libcpab(tess)
        row = []
        for basis in ("libcpab", "vertex"):
            model = CPAB(tess, basis=basis).double()
            theta = torch.randn(4, model.dim, dtype=torch.float64, generator=generator)
            points = torch.rand(4, 2000, 2, dtype=torch.float64, generator=generator) * 3 - 1.5
            ours = model.velocity(points, theta)
            theirs = torch.stack([2 * T.calc_vectorfield(((p + 1) / 2).T.contiguous(), t.view(1, -1)).T
                                  for p, t in zip(points, theta, strict=True)])
            row.append(f"basis={basis}: {(ours - theirs).abs().max().item():.1e}")
        gap = abs(own - T.params.basis).max()
        row.append("libcpab's own basis here: " + ("the same" if gap == 0 else f"another rotation ({gap:.2f} apart)"))
        print(f"   {tess[0]}x{tess[1]}  " + "   ".join(row))


def integrator_table(sizes, n_theta, generator):
    print(f"2. integrators vs float64 RK4 (2000 steps), theta ~ N(0, I), {n_theta} thetas x 32x32 grid")
    lin = torch.linspace(-1, 1, 32, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(lin, lin, indexing="xy"), -1).reshape(1, -1, 2)
    for tess in sizes:
        T, slow, _ = _libcpab(tess)
        model = CPAB(tess).double()
        theta = torch.randn(n_theta, model.dim, dtype=torch.float64, generator=generator)
        points = grid.expand(n_theta, -1, -1)
        ref = rk4(model, points, theta)
        moved = (ref - points).norm(dim=-1).mean().item()
        rows = {"libcpab 50 steps (float32)": _lib_transform(T, slow, points.float(), theta.float()).double(),
                "cpab default (float32)": model.float().transform(points.float(), theta.float()).double(),
                "cpab default (float64)": model.double().transform(points, theta)}
        print(f"   {tess[0]}x{tess[1]} (mean displacement {moved:.2f}):")
        for name, out in rows.items():
            err = (out - ref).abs()
            print(f"      {name:28s} max {err.max().item():.1e}  mean {err.mean().item():.1e}")


def _official_fit(T, slow, x, y, iterations):
    """The official CPABTransformation.forward fit on libcpab (float32), x, y (B, N, 2) in [-1, 1]."""
    theta = T.identity(x.shape[0], epsilon=1e-6).requires_grad_(True)
    optimizer = torch.optim.Adam([theta], lr=1e-2)
    for _ in range(iterations):
        optimizer.zero_grad()
        loss = torch.norm(_lib_transform(T, slow, x, theta) - y)
        loss.backward()
        optimizer.step()
    return theta.detach()


def fit_table(batch, iterations, generator):
    K = 10
    print(f"3. official Adam fit, libcpab vs cpab on the same keypoints (batch {batch}: {batch * K} partial, "
          f"{batch} global warps); warp difference on the 64x64 grid, [-1, 1] units")
    source = torch.rand(batch, K * 5, 2, generator=generator) * 1.6 - 0.8
    driving = source + 0.1 * torch.randn(batch, K * 5, 2, generator=generator)
    lin = torch.linspace(-1, 1, 64)
    grid = torch.stack(torch.meshgrid(lin, lin, indexing="xy"), -1).reshape(1, -1, 2)
    problems = (("partial 4x4", (4, 4), driving.reshape(-1, 5, 2), source.reshape(-1, 5, 2), iterations),
                ("global 6x6", (6, 6), driving, source, int(1.5 * iterations)))
    for name, tess, x, y, steps in problems:
        T, slow, own = _libcpab(tess)
        start = time.perf_counter()
        theta_lib = _official_fit(T, slow, x, y, steps)
        warp_lib = _lib_transform(T, slow, grid.expand(x.shape[0], -1, -1), theta_lib)
        residual_lib = (_lib_transform(T, slow, x, theta_lib) - y).norm(dim=-1).mean().item()
        row = [f"libcpab residual {residual_lib:.4f} ({time.perf_counter() - start:.0f} s)"]
        for basis in ("libcpab", "vertex"):
            model = CPAB(tess, basis=basis)
            theta = model.fit(x, y, method="adam", iterations=steps)
            warp = model.transform(grid.expand(x.shape[0], -1, -1), theta)
            gap = (warp - warp_lib).norm(dim=-1)
            row.append(f"cpab basis={basis}: max {gap.max().item():.1e} mean {gap.mean().item():.1e}")
        if abs(own - T.params.basis).max() > 0:  # the official code with the basis this machine gives it
            T.params.basis = own
            warp_own = _lib_transform(T, slow, grid.expand(x.shape[0], -1, -1), _official_fit(T, slow, x, y, steps))
            gap = (warp_own - warp_lib).norm(dim=-1)
            row.append(f"libcpab with its own basis here: max {gap.max().item():.1e} mean {gap.mean().item():.1e}")
        print(f"   {name} ({steps} steps): " + "; ".join(row))


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.against_libcpab", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller problems (seconds)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(args.seed)
    print(f"torch {torch.__version__}, {args.threads} CPU thread(s), seed {args.seed}{', QUICK' if args.quick else ''}")
    velocity_table([(4, 4), (6, 6)], generator)
    integrator_table([(4, 4), (6, 6)], 2 if args.quick else 16, generator)
    fit_table(1 if args.quick else 4, 10 if args.quick else 100, generator)
    return 0


if __name__ == "__main__":
    sys.exit(main())
