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


def test_gqa_copy_decodes_like_the_engine(tiny_engine, tmp_path):
    """scripts/gqa_step_ab.py's rewritten copy decodes the same logits as the engine: float32 rounding differences are
    ~1e-6 of the logits' scale (2e-6 here, 2.7e-6 at real widths), while a wrong cache slot, mask or RoPE position moves
    attention outputs by a large fraction of max |v| (0.25 for a position off by one, test above); 1e-3 lies between."""
    import json

    ab = script("gqa_step_ab")
    out = tmp_path / "ab.json"
    assert ab.main(["--engine", str(tiny_engine), "--work", str(tmp_path / "copy"), "--steps", "4", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert sum(len(v) for v in result["gqa_layers"].values()) >= 1
    assert result["logits_relative_difference"]["max"] < 1e-3, result
