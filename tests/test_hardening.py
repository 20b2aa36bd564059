"""Bad inputs get a clear error where they enter (issue 13's non-finite hyperparameters)."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn

import normgraph
from normgraph.annotations import AnnotationError


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8, bias=False), nn.ReLU(), nn.Linear(8, 2, bias=False))


@pytest.mark.parametrize("value", [math.nan, math.inf, -1.0])
def test_non_finite_or_negative_masses_are_refused_naming_the_key(value):
    with pytest.raises(ValueError, match=r"masses\['2'\] = .*finite and non-negative"):
        normgraph.analyze(mlp(), (torch.randn(2, 4),), masses={"2": value})


@pytest.mark.parametrize("bad", ["Infinity", "NaN", "-Infinity"])
def test_annotations_with_non_finite_numbers_are_refused(tmp_path, bad):
    ng = normgraph.analyze(mlp(), (torch.randn(2, 4),))
    text = ng.save(tmp_path / "a.json").read_text()
    doc = json.loads(text)
    doc["atoms"][0]["mass"] = "__BAD__"
    (tmp_path / "b.json").write_text(json.dumps(doc).replace('"__BAD__"', bad))
    with pytest.raises(AnnotationError, match="mass"):
        normgraph.load(tmp_path / "b.json")


@pytest.mark.parametrize("kw", [{"lr": math.nan}, {"lr": math.inf}, {"weight_decay": math.nan},
                                {"momentum": math.nan}])
def test_non_finite_optimizer_hyperparameters_are_refused(kw):
    with pytest.raises(ValueError, match="finite"):
        normgraph.compile(mlp(), (torch.randn(2, 4),), compile_mode="eager", **kw)


def test_register_kind_refuses_an_infinite_mass():
    with pytest.raises(ValueError, match="finite"):
        normgraph.register_kind("strange", dual="rms_normalize", norm="RMS", mass=math.inf)
