"""`python -m cpab.benchmark --quick` prints every row (CI smoke test, tiny sizes, in-process on CPU)."""
import re

import torch

from cpab import CPAB, benchmark


def _fit_implemented():
    x = torch.zeros(1, 2, 2)
    try:
        CPAB((2, 2)).fit(x, x, iterations=1)
    except NotImplementedError:
        return False
    return True


def test_quick_benchmark_prints_every_row(capsys):
    benchmark.main(["--quick", "--device", "cpu"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("device: CPU") and "quick" in lines[0]
    assert lines[1].startswith("fast path: not timed without CUDA")
    fits = [line for line in lines if line.startswith("fit ")]
    warps = [line for line in lines if line.startswith("warp ")]
    assert len(lines) == 2 + len(fits) + len(warps)
    assert [line.split()[1:3] for line in fits] == [[m, g] for m in ("adam", "gauss_newton")
                                                    for g in ("partial", "global")]
    assert [(line.split()[1], line.split()[4]) for line in warps] == [
        (f"{s}x{s}", mode) for s in (8, 12) for mode in ("forward", "forward+backward")]
    timed_rows = warps + (fits if _fit_implemented() else [])
    for line in timed_rows:
        assert re.search(r"ref +\d+\.\d+ ms", line), line  # the reference was timed
    for line in fits + warps:
        assert re.search(r"fast +n/a", line), line  # no fast path without CUDA
    for line in fits:
        before, after = re.search(r"residual (\d\.\d+) -> ref (\S+)", line).groups()
        if line in timed_rows:
            assert float(after) < float(before), line  # the fit moved the keypoints towards their targets
