"""Every Triton kernel specialisation cpab launches compiles for sm_80 and sm_90, without a GPU, with no
register spill, IEEE division and no FMA contraction in the points kernel (tests/cpab/compile_kernels.py:
Triton's ahead-of-time compiler, then ptxas -v). A fresh process without TRITON_INTERPRET; Triton caches
the compiles, so only the first run is slow (a few minutes on a 2-core CPU)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from cpab import fused

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.slow
@pytest.mark.skipif(not fused.HAS_TRITON or torch.cuda.is_available(), reason="needs triton; GPU runs compile anyway")
def test_every_kernel_specialisation_compiles_for_sm80_and_sm90_without_spills():
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, os.path.join(HERE, "compile_kernels.py"), "--arch", "80", "90"],
                            env=env, capture_output=True, text=True, timeout=3600)
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    compiles = [r for r in records if not r.get("summary")]
    bad = [r for r in compiles if not r["ok"] or r["spill_stores"] or r["spill_loads"] or r["approximate_division"]
           or r["fma"]]
    assert result.returncode == 0 and not bad, (bad[:3], result.stderr[-3000:])
    assert {r["arch"] for r in compiles} == {80, 90}
    kinds = {(r["kernel"], r["dtype"]) for r in compiles}
    assert kinds == {(k, d) for k in ("_points_kernel", "_cells_kernel", "_lm_kernel") for d in ("fp32", "fp64")}
    assert len(compiles) >= 2 * 60 and max(r["registers"] for r in compiles) <= 255
