"""benchmarks/repro/presets.py: the scouted `fmnist-5k` preset is what its pre-registered protocol says it is."""

from __future__ import annotations

from pathlib import Path

from benchmarks import reproduce
from benchmarks.repro.config import seeds

PROTOCOL = Path(__file__).resolve().parents[2] / "benchmarks" / "protocols" / "fmnist-5k-confirmation.md"


def test_fmnist_5k_is_fmnist_on_half_the_training_images_with_fresh_seeds():
    config = reproduce.build_config(reproduce.make_parser().parse_args(["--preset", "fmnist-5k"]))
    base = reproduce.build_config(reproduce.make_parser().parse_args(["--preset", "fmnist"]))
    assert config["train_size"] == 5_000 and base["train_size"] == 10_000
    for key in ("dataset", "model_kwargs", "batch_size", "micro_batch_size", "steps", "eval_every", "bn_recalibrate",
                "grad_method", "momentum", "weight_decay"):
        assert config[key] == base[key], key
    assert seeds(config) == list(range(100, 108))
    resolved = config["resolved"]
    assert list(resolved) == ["SB", "LB", "GN", "FT", "GN-sub=2"]
    assert resolved["GN"]["penalty"] == resolved["GN-sub=2"]["penalty"] == resolved["FT"]["penalty"] == 0.01
    assert all(hp["lr"] == 0.1 for hp in resolved.values())


def test_the_protocol_names_the_preset_its_seeds_and_lambdas():
    text = PROTOCOL.read_text()
    assert "Preset `fmnist-5k`" in text and "Fresh seeds **100–107** (8 seeds)" in text
    assert "| GN | 0.01 |" in text and "| FT | 0.01 |" in text and "| GN-sub=2 | 0.01 |" in text
    assert "--preset fmnist-5k --methods SB LB --threads 1 --jobs 1" in text
