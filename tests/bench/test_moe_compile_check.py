"""Every variant of the fused MoE kernels (plain, fp8, fp8-block, int8, int4; sorted and direct; the
shared-expert pass) compiles for a Hopper GPU (sm_90) here, without a GPU: the Triton interpreter
accepts code the GPU compiler rejects (e.g. plain-int globals), so this catches it on CPU machines."""

import json
import subprocess
import sys

from tests.paths import REPO


def test_every_fused_moe_kernel_variant_compiles_for_sm90():
    r = subprocess.run([sys.executable, "bench/moe_compile_check.py", "--json"], cwd=REPO, capture_output=True,
                       text=True, timeout=600)
    out = json.loads(r.stdout.strip().splitlines()[-1])
    bad = [row for row in out["rows"] if not row["ok"]]
    assert r.returncode == 0 and not bad and len(out["rows"]) == 24, bad or r.stderr[-2000:]
