"""regopt.doctor on tiny models: its verdicts (exact path, equality with the naive loop, finite-difference
faithfulness, step costs, the drop-in contract), a model that breaks the exact path (a missing double backward,
a once_differentiable cut), a timm ViT with fused attention, a part that overruns, and the command line's three
report files."""

from __future__ import annotations

import json
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from regopt import doctor
from regopt.doctor.__main__ import main
from test_exact_errors import _Gate, _SquareOnce  # hardsigmoid: no double backward; x²: once_differentiable


def loss_fn(model, x, y):
    logits = model(x)
    return F.cross_entropy(logits, y), logits


def tiny_cnn() -> nn.Module:
    """A 1×6×6 → 3 conv net with BatchNorm (a command-line factory: ``test_doctor:tiny_cnn``)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 3, bias=False), nn.BatchNorm2d(2), nn.Tanh(), nn.Flatten(),
                         nn.Linear(2 * 4 * 4, 3))


def batch_for(shape, size=8, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(size, *shape, generator=g), torch.randint(0, classes, (size,), generator=g)


def test_a_small_cnn_gets_every_verdict(tmp_path):
    model = tiny_cnn()
    before = [t.clone() for t in model.state_dict().values()]
    report = doctor.run(model, loss_fn, batch_for((1, 6, 6)), micro_batch_size=4, rounds=1, out=tmp_path)
    assert [p.name for p in report.parts] == list(doctor.PART_NAMES)
    assert report.part("exact").status == "ok" and report.part("exact").data["exact_runs"]
    reference = report.part("reference")
    assert reference.status == "ok" and [r["status"] for r in reference.data["rows"]] == ["ok"] * 8
    assert all(r["max_rel_err"] < 1e-12 for r in reference.data["rows"])
    fd = report.part("fd")
    assert [r["fd_eps"] for r in fd.data["rows"]] == [1e-2, 1e-3] and fd.data["recommend"] in ("exact",
                                                                                               "finite_difference")
    assert all(0 < r["rel_err"] < 1 and r["cos"] > 0.5 for r in fd.data["rows"])
    rows = {r["row"]: r for r in report.part("timing").data["rows"]}
    assert list(rows) == ["SGD-accum", "LB", "GN-exact", "GN-finite_difference", "GN-exact-sub=1",
                          "GN-finite_difference-sub=1"]
    assert rows["SGD-accum"]["ratio"] == 1.0 and all(r["ratio"] > 0 and r["peak_mib"] is None for r in rows.values())
    assert "n/a on the CPU" in report.text()
    assert report.part("contract").status == "ok"
    assert all(torch.equal(a, b) for a, b in zip(before, model.state_dict().values()))  # the model is untouched
    saved = json.loads((tmp_path / "report.json").read_text())
    assert [p["status"] for p in saved["parts"]] == [p.status for p in report.parts]
    assert "| 1 | exact penalty (double backward) | ok |" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "report.txt").read_text().strip() == report.text()


class Square(nn.Module):
    def forward(self, x):
        return _SquareOnce.apply(x)


@pytest.mark.parametrize("middle, named, silent", [(_Gate, "1.scale_activation (Hardsigmoid)", False),
                                                   (Square, "1 (Square)", False)])
def test_a_model_that_breaks_the_exact_path_is_named(middle, named, silent):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), middle(), nn.Linear(4, 3))
    report = doctor.run(model, loss_fn, batch_for((3,)), micro_batch_size=4, rounds=1,
                        parts=("exact", "reference", "fd", "timing"))
    exact = report.part("exact")
    assert exact.status == "fail" and exact.data["modules"] == [named] and exact.data["silent"] is silent
    assert f"does not work on this model: {named}" in exact.verdict
    assert "method='finite_difference'" in exact.details[-1]
    statuses = {r["method"]: r["status"] for r in report.part("reference").data["rows"]}
    assert statuses == {"LB": "ok", "GN": "skip", "FT": "skip", "AJ": "skip", "UJ": "skip", "GRAFT-iter": "ok",
                        "GRAFT-ext": "ok", "NGD": "ok"}
    assert report.part("fd").status == "skip"
    timed = [r["row"] for r in report.part("timing").data["rows"]]
    assert "GN-exact" not in timed and "GN-finite_difference" in timed


def test_a_timm_vit_with_fused_attention_names_the_attention_and_its_switch():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8, depth=1,
                              embed_dim=24, num_heads=2, num_classes=3)
    assert model.blocks[0].attn.fused_attn
    report = doctor.run(model, loss_fn, batch_for((3, 16, 16), size=4), micro_batch_size=2, rounds=1,
                        parts=("exact", "fd"))
    exact = report.part("exact")
    assert exact.data["modules"] == ["blocks.0.attn (Attention)"] and "fused_attn=False" in exact.details[-1]
    assert exact.status == "warn" and exact.data["runs_with_math_attention"]  # the switch works, and is used:
    assert report.part("fd").status in ("ok", "warn") and len(report.part("fd").data["rows"]) == 2


def test_a_part_that_overruns_is_reported_and_the_others_still_run():
    calls = []

    def slow_first_call(model, x, y):
        calls.append(None)
        if len(calls) == 1:
            time.sleep(3.0)  # past the exact part's hard limit (0.1 s · 1.1 + 1 s)
        return loss_fn(model, x, y)

    report = doctor.run(tiny_cnn(), slow_first_call, batch_for((1, 6, 6)), micro_batch_size=4, time_limit=0.1,
                        parts=("exact", "contract"))
    assert report.part("exact").status == "timeout" and "time limit" in report.part("exact").verdict
    assert report.part("contract").status == "ok"
    assert "[TIMEOUT]" in report.text()


def test_a_part_that_raises_is_reported_and_the_others_still_run():
    def no_logits(model, x, y):  # FT, AJ and UJ need the logits: their rows fail, the others run
        return F.cross_entropy(model(x), y)

    report = doctor.run(tiny_cnn(), no_logits, batch_for((1, 6, 6)), micro_batch_size=4, parts=("reference",))
    statuses = {r["method"]: r["status"] for r in report.part("reference").data["rows"]}
    assert statuses["FT"] == statuses["AJ"] == statuses["UJ"] == "error" and statuses["GN"] == "ok"
    assert "needs the logits" in next(r["note"] for r in report.part("reference").data["rows"] if r["method"] == "FT")


def test_the_contract_part_names_one_example_micro_batches_frozen_and_unreached_parameters():
    model = nn.ModuleDict({"body": tiny_cnn(), "unused": nn.Linear(2, 2)})
    model.forward = model["body"].forward  # the loss never reaches "unused"
    model["body"][0].weight.requires_grad_(False)
    report = doctor.run(model, loss_fn, batch_for((1, 6, 6), size=9), micro_batch_size=4, parts=("contract",))
    part = report.part("contract")
    assert part.status == "fail" and "a micro-batch of one example (sizes [4, 4, 1])" in part.details[0]
    assert part.data["frozen"] == ["body.0.weight"] and part.data["unreached"] == ["unused.weight", "unused.bias"]


def test_the_command_line_writes_three_reports(tmp_path, capsys):
    assert main(["test_doctor:tiny_cnn", "--input", "1,6,6", "--batch", "8", "--micro-batch", "4",
                 "--parts", "exact,contract", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "1. [ok] exact penalty (double backward): method='exact' runs" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "report.md", "report.txt"]
    assert json.loads((tmp_path / "report.json").read_text())["setting"]["batch_size"] == 8


def test_the_command_line_refuses_what_it_cannot_load():
    with pytest.raises(SystemExit, match="MODULE:NAME"):
        main(["tiny_cnn", "--input", "1,6,6"])
    with pytest.raises(SystemExit, match="has no 'missing'"):
        main(["test_doctor:missing", "--input", "1,6,6"])
    with pytest.raises(ValueError, match="unknown parts"):
        doctor.run(tiny_cnn(), loss_fn, batch_for((1, 6, 6)), micro_batch_size=4, parts=("speed",))
