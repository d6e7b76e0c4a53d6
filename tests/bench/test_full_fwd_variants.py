"""bench/full_fwd_variants.py on the CPU (`--dry-run`, Triton interpreted): every variant is checked against the
reference and the default variant before it may be timed, a descriptor variant that falls back is not passed off as
itself, and the variant table is not changed by a run."""
import json
import os
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: `bench` is a package there
from bench import full_fwd_variants as ffv  # noqa: E402
from hysparse_compile.kernels.triton import common  # noqa: E402
from hysparse_compile.kernels.triton import full_attention as fa  # noqa: E402


def run(tmp_path, *args):
    rc = ffv.main(["--dry-run", "--out", str(tmp_path), *args])
    return rc, json.loads((tmp_path / "full_fwd_variants.json").read_text())


@pytest.mark.skipif(common.TensorDescriptor is None, reason="this Triton has no host-side tensor descriptors")
def test_dry_run_checks_each_variant_against_reference_and_default(tmp_path):
    before = json.dumps(ffv.VARIANTS, sort_keys=True)
    rc, res = run(tmp_path, "--variants", "tma_acc_128x64_w8_s3", "--set-default")
    assert rc == 0 and [c["variant"] for c in res["checks"]] == [ffv.DEFAULT, "tma_acc_128x64_w8_s3"]
    for c in res["checks"]:
        assert c["ok"] and c["out_rel"] < 1e-5 and c["idx_rows_as_reference"] == 1.0 and c["fell_back"] is None
    assert res["variants"]["tma_acc_128x64_w8_s3"]["BLOCK_M"] == 32  # shrunk for the interpreter, in the run only
    row = res["times"][0]
    assert row["layout"] == "model" and all(row[f"{n}_{w}_ms"] > 0 for n in res["variants"] for w in ("sel", "nosel"))
    assert "fastest" not in res  # no cuDNN row on the CPU: nothing to rank against
    assert json.dumps(ffv.VARIANTS, sort_keys=True) == before


@pytest.mark.skipif(common.TensorDescriptor is None, reason="this Triton has no host-side tensor descriptors")
def test_a_variant_that_falls_back_fails_its_check(tmp_path, monkeypatch):
    def refuse(*a, **k):
        raise RuntimeError("no descriptors")

    monkeypatch.setattr(common, "TensorDescriptor", refuse)
    monkeypatch.setattr(fa, "TMA_FAILED", {})
    with pytest.warns(RuntimeWarning):
        rc, res = run(tmp_path, "--variants", "tma_64x64_w4_s3")
    bad = [c for c in res["checks"] if c["variant"] == "tma_64x64_w4_s3"]
    assert rc == 1 and not bad[0]["ok"] and "no descriptors" in json.dumps(bad[0]["fell_back"])


def test_unknown_variant_is_named_with_the_valid_ones():
    with pytest.raises(SystemExit, match="unknown --variants \\['tma_fast'\\]; valid: ptr_64x64_w4_s3"):
        ffv.main(["--dry-run", "--variants", "tma_fast"])
