"""Each example runs as documented, in its reduced (--tiny / --steps 3) form."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from types import ModuleType

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("optimizer", ["normgraph", "adamw", "muon"])
def test_train_gpt(optimizer: str) -> None:
    r = load("train_gpt").main(["--tiny", "--steps", "3", "--optimizer", optimizer,
                                "--device", "cpu"])
    assert len(r.losses) == 3 and all(math.isfinite(x) for x in r.losses)


def test_cnn() -> None:
    pytest.importorskip("sklearn")
    out = load("cnn").main(["--steps", "30"])
    for loss, acc in out.values():
        assert math.isfinite(loss) and acc > 0.3  # 10 classes: chance is 0.1


def test_lr_transfer(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    png = tmp_path / "lr.png"
    res = load("lr_transfer").main(["--tiny", "--out", str(png)])
    assert set(res) == {"normgraph", "adamw"} and png.stat().st_size > 1000
    assert all(len(v) == 2 for by_w in res.values() for v in by_w.values())


def test_hf_trainer() -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    loss = load("hf_trainer").main(["--tiny", "--steps", "3"])
    assert math.isfinite(loss)
