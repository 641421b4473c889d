"""Oracle: ideal head outputs built from the ground truth of the synthetic val split, run
through the real post-processing and scored by panopticapi, must give PQ >= 99."""

from conftest import load_prepare_synthetic, load_repo_module


def test_oracle_pq_on_synthetic_val(tmp_path):
    load_prepare_synthetic().prepare_synthetic(
        str(tmp_path), num_train=1, num_val=40, verbose=False
    )
    oracle = load_repo_module("benchmarks/oracle_pq.py")
    pq, table = oracle.run_oracle(str(tmp_path), "val", verbose=False)
    assert pq["All"]["pq"] * 100 >= 99.0, pq["All"]
    assert pq["Stuff"]["pq"] * 100 >= 99.0, pq["Stuff"]
    assert pq["Things"]["pq"] * 100 >= 98.0, pq["Things"]
    for tag in ("touching", "ring", "border-cut", "tiny (<16x16 px)", "many (>=10 per image)"):
        assert table[tag]["count"] >= 10, (tag, table[tag])
        assert table[tag]["PQ"] >= 97.0, (tag, table[tag])
