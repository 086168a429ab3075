"""benchmarks/speed.py runs end to end on a tiny setting and reports every method."""

import json
import time

import torch

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


def _tiny_args(*extra):
    return speed.parse_args(["--batch", "4", "--micro", "2", "--steps", "2", "--warmup", "0", "--no-reference",
                             "--only", "GN-exact", *extra])


def test_a_failing_row_is_reported_and_the_others_go_on():
    args = _tiny_args()
    model = speed.build_table_model(args, torch.device("cpu"))
    rows = speed.make_rows(args, model)

    def broken(batch):
        raise RuntimeError("no double backward here\nsecond line")
    rows[2].step = broken
    timed = speed.time_rows(rows, speed.random_batch(args, torch.device("cpu")), torch.device("cpu"), args)
    results = {r["method"]: r for r in speed.row_results(rows)}
    assert timed == 2 and results["GN-exact"]["status"] == "error: RuntimeError: no double backward here"
    assert results["GN-exact"]["ms_per_step"] is None and results["GN-exact"]["ratio_to_sgd_accum"] is None
    assert len(results["LB"]["times_ms"]) == 2 and results["LB"]["status"] == "ok"
    assert "error: RuntimeError" in speed.markdown({"rows": list(results.values())})


def test_slow_rows_are_dropped_and_the_budget_ends_the_rounds():
    args = _tiny_args("--row-limit", "1e-9", "--steps", "3")
    result = speed.run(args)
    rows = {r["method"]: r for r in result["rows"]}
    assert rows["SGD-accum"]["status"] == "ok" and len(rows["SGD-accum"]["times_ms"]) == 3  # the baseline stays
    assert rows["LB"]["status"].startswith("dropped after round 1") and len(rows["LB"]["times_ms"]) == 1
    past = time.perf_counter() - 1.0  # a spent budget still gives one timed round after the warm-up
    assert speed.run(_tiny_args("--warmup", "1", "--steps", "5"), deadline=past)["timed_rounds"] == 1


def test_suite_skips_a_table_that_the_budget_cannot_fit(monkeypatch, tmp_path):
    small = dict(model="small-cnn", model_kwargs={"widths": [2, 2, 2]}, batch=4, micro=2, warmup=0, steps=1,
                 only=["GN-exact"], bf16_rows=["LB"])
    monkeypatch.setitem(speed.SUITES, "test", [
        dict(table="first", title="first", targets=True, budget=0.5, needs=0, settings=small),
        dict(table="second", title="second", budget=0.5, needs=2.0, settings=small)])
    monkeypatch.setattr(speed, "SUITE_DEFAULTS", {"device": "cpu", "cudnn_benchmark": False})
    out = tmp_path / "suite.json"
    speed.main(["--suite", "test", "--budget", "100", "--json", str(out), "--markdown", str(tmp_path / "s.md")])
    suite = json.loads(out.read_text())
    first, second = suite["tables"]
    assert suite["complete"] and [r["method"] for r in first["rows"]] == ["SGD-accum", "LB", "GN-exact", "LB-bf16"]
    assert second["skipped"].endswith("this table needs 200 s") and not second["rows"]
    assert [t["reached"] for t in first["targets"]][3] is None  # no peak memory on the CPU
    text = (tmp_path / "s.md").read_text()
    assert "## first" in text and "Skipped: " in text and "Targets (H100" in text


def test_resident_bytes_counts_each_storage_of_the_row_once():
    args = speed.parse_args(["--batch", "4", "--micro", "2", "--only", "GN-exact", "--no-reference"])
    cpu = torch.device("cpu")
    rows = speed.make_rows(args, speed.build_table_model(args, cpu))
    batch = speed.random_batch(args, cpu)
    row = rows[2]
    row.step(batch)  # now every parameter has a .grad
    params = list(row.model.parameters())
    expected = sum(4 * (2 * p.numel()) for p in params) + sum(b.numel() * b.element_size() for b in row.model.buffers())
    expected += batch[0].numel() * 4 + batch[1].numel() * 8
    assert speed.resident_bytes(row, batch, cpu) == expected
    assert speed.resident_bytes(row, batch, torch.device("cuda")) == 0  # only the given device's tensors count


def test_default_run_times_the_subsampled_penalty_at_one_and_a_quarter_of_the_micro_batches():
    args = speed.parse_args([])  # B = 256, |M| = 32: k = 8
    assert speed.subsample_sizes(args) == [1, 2]
    rows = speed.row_builders(args)
    for name in ("GN", "FT"):
        for method in ("exact", "finite_difference"):
            assert {f"{name}-{method}-sub=1", f"{name}-{method}-sub=2"} <= rows.keys()
    assert speed.subsample_sizes(speed.parse_args(["--batch", "8", "--micro", "4"])) == [1]  # k = 2: k/4 = 0
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    optimizer, _ = rows["GN-exact-sub=1"](model, model)
    assert optimizer.penalty_micro_batches == 1
