"""benchmarks/repro/methods.py and config.py: the method-name grammar (λ and |M| variants), its errors,
and how a variant's hyperparameters are resolved; presets default to exact penalties."""

from __future__ import annotations

import json
import math

import pytest
import torch

from benchmarks import data as data_lib
from benchmarks import reproduce
from benchmarks.repro import config as config_lib
from benchmarks.repro import methods
from benchmarks.repro.methods import MethodSpec, parse_method

TINY = ["--dataset", "synthetic", "--widths", "4", "8", "--batch-size", "16", "--micro-batch-size", "4",
        "--eval-every", "2", "--eval-size", "0", "--test-size", "0", "--bn-recalibrate", "2", "--no-progress",
        "--threads", "1"]


def _config(*argv):
    return config_lib.build_config(reproduce.make_parser().parse_args(list(argv)))


@pytest.mark.parametrize("name, expected", [
    ("GN", MethodSpec("GN", "GN")),
    ("GN@λ=0.03", MethodSpec("GN@λ=0.03", "GN", None, 0.03)),
    ("GN@lambda=0.03", MethodSpec("GN@λ=0.03", "GN", None, 0.03)),  # the ASCII spelling, canonicalized
    ("FT@λ=3e-2", MethodSpec("FT@λ=0.03", "FT", None, 0.03)),
    ("UJ@λ=1e-05", MethodSpec("UJ@λ=1e-05", "UJ", None, 1e-5)),
    ("AJ@λ=0", MethodSpec("AJ@λ=0.0", "AJ", None, 0.0)),
    ("GN@λ=0.03-|M|=1024", MethodSpec("GN@λ=0.03-|M|=1024", "GN", 1024, 0.03)),
    ("GN@lambda=.1-|M|=0128", MethodSpec("GN@λ=0.1-|M|=128", "GN", 128, 0.1)),
    ("LB-|M|=64", MethodSpec("LB-|M|=64", "LB", 64)),
    ("GRAFT-iter", MethodSpec("GRAFT-iter", "GRAFT-iter")),
])
def test_variant_names_parse_to_canonical_specs(name, expected):
    spec = parse_method(name)
    assert spec == expected
    assert parse_method(spec.name) == spec  # the canonical name reads back as itself


@pytest.mark.parametrize("name, message", [
    ("XX", "unknown method 'XX'"),
    ("gn", "unknown method"),
    ("GRAFT", "unknown method"),
    ("GN@λ=", "invalid λ"),
    ("GN@λ=abc", "invalid λ"),
    ("GN@λ=-0.1", "finite number >= 0"),
    ("GN@λ=nan", "invalid λ"),
    ("LB@λ=0.1", "applies only to GN, FT, AJ, UJ, not LB"),
    ("GRAFT-ext@lambda=0.1", "not GRAFT-ext"),
    ("GN-|M|=", "invalid micro-batch size"),
    ("GN-|M|=0", "integer >= 1"),
    ("GN-|M|=x", "invalid micro-batch size"),
    ("GN-|M|=8@λ=0.1", "in the order of BASE[@λ=VALUE][-|M|=SIZE]"),
    ("GN@λ=0.1@λ=0.2", "at most once"),
    ("GN@λ=0.1x", "cannot read 'x'"),
    ("GNX", "cannot read 'X'"),
])
def test_malformed_names_say_what_is_wrong(name, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("|", r"\|")):
        parse_method(name)


def test_lookup_keys_go_from_specific_to_general():
    spec = parse_method("GN@λ=0.03-|M|=1024")
    assert methods.lookup_keys(spec) == ["GN@λ=0.03-|M|=1024", "GN@λ=0.03", "GN-|M|=1024", "GN", "default"]
    assert methods.lookup_keys(parse_method("SB")) == ["SB", "default"]


def test_variant_hyperparameters_and_the_default_penalty():
    config = _config("--methods", "GN", "GN@λ=0.03", "GN@lambda=0.03-|M|=64", "FT", "--penalty", "GN=0.2",
                     "--lr", "GN@lambda=0.03=0.5")
    resolved = config["resolved"]
    assert config["methods"] == ["GN", "GN@λ=0.03", "GN@λ=0.03-|M|=64", "FT"]
    assert resolved["GN"]["penalty"] == 0.2  # --penalty sets the λ of names that give none
    assert resolved["GN@λ=0.03"]["penalty"] == 0.03 and resolved["GN@λ=0.03-|M|=64"]["penalty"] == 0.03
    assert resolved["FT"]["penalty"] == 0.01  # the preset's
    assert resolved["GN@λ=0.03-|M|=64"]["micro_batch_size"] == 64
    assert resolved["GN@λ=0.03"]["lr"] == 0.5 and resolved["GN@λ=0.03-|M|=64"]["lr"] == 0.5  # canonicalized key
    assert resolved["GN"]["lr"] == 0.1
    same = _config("--methods", "GN@λ=0.03", "GN@lambda=3e-2")  # two spellings, one run
    assert same["methods"] == ["GN@λ=0.03"]


def test_bad_names_on_the_command_line_exit_clearly():
    with pytest.raises(SystemExit, match="applies only to"):
        _config("--methods", "SB", "LB@λ=0.1")
    with pytest.raises(SystemExit, match="--penalty 'GQ=0.1'"):
        _config("--penalty", "GQ=0.1")


def test_safe_names_are_distinct_file_names():
    names = ["GN", "GN@λ=0.03", "GN@λ=0.3", "GN-|M|=1024", "GN@λ=0.03-|M|=1024", "GRAFT-ext"]
    safe = [methods.safe_name(parse_method(n).name) for n in names]
    assert len(set(safe)) == len(safe) and all("/" not in s and "|" not in s and "@" not in s for s in safe)
    assert methods.safe_name("GN-|M|=2560") == "GN-M=2560"  # what earlier versions named checkpoints


def test_every_preset_defaults_to_exact_penalties_and_quick_to_the_embedded_subset():
    for preset in reproduce.PRESETS:
        assert _config("--preset", preset)["grad_method"] == "exact", preset
    assert _config()["dataset"] == "fashion-mnist-subset"
    assert _config("--method", "finite_difference")["grad_method"] == "finite_difference"


def test_lambda_variants_run_side_by_side(tmp_path):
    """GN@λ=0 is LB step for step; GN@λ=0.5 is its own run with its own rows; --penalty GN=0 leaves it alone."""
    out = tmp_path / "sweep"
    reproduce.main([*TINY, "--steps", "4", "--methods", "LB", "GN", "GN@λ=0", "GN@lambda=0.5", "--penalty", "GN=0",
                    "--out", str(out)])
    runs = {r["method"]: r for r in json.loads((out / "runs.json").read_text())}
    assert list(runs) == ["LB", "GN", "GN@λ=0.0", "GN@λ=0.5"]
    assert runs["GN"]["penalty"] == 0.0 and runs["GN@λ=0.5"]["penalty"] == 0.5
    rows = {m: torch.load(out / "checkpoints" / f"seed0_{methods.safe_name(m)}.pt", weights_only=True)["rows"]
            for m in runs}
    losses = {m: [r["train_loss"] for r in rs] for m, rs in rows.items()}
    assert losses["LB"] == losses["GN"] == losses["GN@λ=0.0"] and len(losses["LB"]) == 2
    assert losses["GN@λ=0.5"] != losses["LB"] and all(r["penalty"] > 0 for r in rows["GN@λ=0.5"])
    summary = (out / "summary.md").read_text()
    assert "| `GN@λ=0.5` | 0.1 | 0.5 |" in summary and "λ (∇R exact)" in summary
    config = json.loads((out / "config.json").read_text())["config"]
    source = data_lib.load("synthetic").source  # the data set's own words for where it came from
    assert config["grad_method"] == "exact" and config["data_source"] == source and source
    assert f"Data source: {source}." in summary
    assert all(math.isfinite(r["test_acc"]) for r in runs.values())


# -- the subsampled-penalty suffix (-sub=m) -----------------------------------------------------------
@pytest.mark.parametrize("name, expected", [
    ("GN-sub=1", MethodSpec("GN-sub=1", "GN", penalty_micro_batches=1)),
    ("GN@λ=0.03-sub=1", MethodSpec("GN@λ=0.03-sub=1", "GN", None, 0.03, 1)),
    ("GN-|M|=256-sub=2", MethodSpec("GN-|M|=256-sub=2", "GN", 256, None, 2)),
    ("FT@lambda=3e-2-|M|=64-sub=02", MethodSpec("FT@λ=0.03-|M|=64-sub=2", "FT", 64, 0.03, 2)),
    ("UJ-sub=8", MethodSpec("UJ-sub=8", "UJ", penalty_micro_batches=8)),
])
def test_subsampled_names_parse_in_grammar_order(name, expected):
    spec = parse_method(name)
    assert spec == expected and parse_method(spec.name) == spec


@pytest.mark.parametrize("name, message", [
    ("GN-sub=", "invalid penalized micro-batch count"),
    ("GN-sub=0", "integer >= 1"),
    ("GN-sub=-1", "invalid penalized micro-batch count"),
    ("GN-sub=1.5", "cannot read '.5'"),
    ("LB-sub=1", "applies only to GN, FT, AJ, UJ, not LB"),
    ("GRAFT-iter-sub=2", "not GRAFT-iter"),
    ("GN-sub=1-|M|=64", "in the order of BASE[@λ=VALUE][-|M|=SIZE][-sub=COUNT]"),
    ("GN-sub=1@λ=0.1", "in the order of"),
    ("GN-sub=1-sub=2", "at most once"),
])
def test_malformed_subsampled_names_say_what_is_wrong(name, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("|", r"\|")):
        parse_method(name)


def test_subsampled_variants_look_up_their_base_and_cost_apart():
    spec = parse_method("GN@λ=0.03-|M|=64-sub=2")
    keys = methods.lookup_keys(spec)
    assert keys[0] == "GN@λ=0.03-|M|=64-sub=2" and keys[-2:] == ["GN", "default"] and "GN@λ=0.03-|M|=64" in keys
    hp = {"batch_size": 256, "micro_batch_size": 64}
    assert methods.cost_kind(spec, hp) == ("GN-sub=2", 256, 64)
    assert methods.cost_kind(parse_method("GN@λ=0.03"), hp)[0] == "GN"
    assert methods.safe_name("GN-|M|=64-sub=2") == "GN-M=64-sub=2"


def test_subsampled_variants_build_optimizers_with_penalty_micro_batches():
    config = _config("--methods", "GN-sub=1", "FT-sub=2")
    model = torch.nn.Linear(3, 2)
    for name, cls, m in (("GN-sub=1", "GradNormSGD", 1), ("FT-sub=2", "FisherTraceSGD", 2)):
        spec = parse_method(name)
        generator = torch.Generator()
        opt = methods.build_optimizer(spec, model, config["resolved"][name], config, generator, None)
        assert type(opt).__name__ == cls and opt.penalty_micro_batches == m and opt.generator is generator
    opt = methods.build_optimizer(parse_method("GN"), model, config["resolved"]["GN-sub=1"], config, None, None)
    assert opt.penalty_micro_batches is None


def test_subsampled_variants_run_side_by_side(tmp_path):
    """With k = 16/4 = 4 micro-batches, GN-sub=4 is GN step for step (m >= k); GN-sub=1 is its own run."""
    out = tmp_path / "sub"
    reproduce.main([*TINY, "--steps", "4", "--methods", "GN", "GN-sub=4", "GN-sub=1", "--penalty", "GN=0.5",
                    "--out", str(out)])
    runs = {r["method"]: r for r in json.loads((out / "runs.json").read_text())}
    assert list(runs) == ["GN", "GN-sub=4", "GN-sub=1"]
    rows = {m: torch.load(out / "checkpoints" / f"seed0_{methods.safe_name(m)}.pt", weights_only=True)["rows"]
            for m in runs}
    losses = {m: [r["train_loss"] for r in rs] for m, rs in rows.items()}
    assert losses["GN"] == losses["GN-sub=4"] and len(losses["GN"]) == 2
    assert losses["GN-sub=1"] != losses["GN"]
    assert all(math.isfinite(r["test_acc"]) for r in runs.values())
