"""benchmarks/speed.py runs end to end on a tiny setting and reports every method."""

import json

from benchmarks import speed


def test_speed_benchmark_table_and_json(tmp_path, capsys):
    out = tmp_path / "speed.json"
    speed.main(["--batch", "4", "--micro", "2", "--steps", "1", "--warmup", "0", "--json", str(out)])
    result = json.loads(out.read_text())
    names = [row["method"] for row in result["rows"]]
    assert names[:2] == ["SGD-accum", "LB"]
    for penalty in ("GN", "FT", "AJ", "UJ"):
        assert {f"{penalty}-exact", f"{penalty}-finite_difference", f"{penalty}-reference"} <= set(names)
    assert {"GRAFT-iter", "GRAFT-ext", "NGD"} <= set(names)
    rows = {row["method"]: row for row in result["rows"]}
    assert rows["SGD-accum"]["ratio_to_sgd_accum"] == 1.0 and rows["GN-reference"]["ratio_to_reference"] == 1.0
    assert all(row["ms_per_step"] > 0 and len(row["times_ms"]) == 1 for row in result["rows"])
    table = capsys.readouterr().out
    assert "| GN-exact |" in table and "× reference" in table
