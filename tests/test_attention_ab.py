"""scripts/attention_ab.py (issue 13) compares like with like: the attention block it cuts out of an engine's segment
graph and the ONNX Runtime GroupQueryAttention node it builds give the same output within float32 rounding (the bound
is derived in the script from the inputs' norms; a wrong RoPE, mask or cache slot moves the output by a fraction of
max |v|, far above it)."""

import pytest

from helpers import script


@pytest.mark.parametrize("segment", ["segment0", "segment1"])
def test_block_and_group_query_attention_agree(tiny_engine, segment, tmp_path):
    import json

    ab = script("attention_ab")
    out = tmp_path / "ab.json"
    assert ab.main(["--engine", str(tiny_engine), "--segment", segment, "--lengths", "37,5", "--rounds", "1", "--cache-mb", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["block_nodes"] > 10 and "Softmax" in result["block_ops"]
    for run in result["runs"]:
        assert run["max_abs_difference"] <= run["rounding_bound"], run
        assert run["rounding_bound"] < 1e-3 * run["max_abs_output"], run  # the check can tell a wrong output from rounding
