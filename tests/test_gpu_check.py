"""The prepared GPU check (benchmarks/gpu_check.sh) and its scripts, exercised on the CPU.

No test here times anything: they check that the scripts run, write what they promise, and
compare optimizers fairly (same initial weights, same batches, warm-up fully undone).
"""
from __future__ import annotations

import ast
import importlib.util
import json
import math
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"


def load(name: str) -> ModuleType:
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- gpu_train_compare.py ---------------------------------------------------------------------

def test_smoothing_and_time_to_target() -> None:
    tc = load("gpu_train_compare")
    assert tc.smooth([4.0, 2.0, 0.0, 2.0], 2) == [4.0, 3.0, 1.0, 1.0]
    secs, losses = [1.0, 2.0, 3.0, 4.0], [4.0, 2.0, 0.0, 2.0]
    assert tc.time_to_target(secs, losses, 1.0, 2) == (3.0, 2)  # first trailing mean ≤ 1
    assert tc.time_to_target(secs, losses, 0.5, 2) is None
    runs = [dict(losses=[3.0, 1.0]), dict(losses=[3.0, 2.0]), dict(losses=[3.0, math.nan]), dict(losses=[])]
    assert tc.auto_target(runs, 1) == 2.0  # the lowest loss every finite run reached


def test_lr_schedules_decay_to_zero() -> None:
    tc = load("gpu_train_compare")
    assert [tc.lr_factor("steps", s, 4, 0.0, None) for s in range(4)] == [1.0, 0.75, 0.5, 0.25]
    assert tc.lr_factor("time", 0, 4, 15.0, 60.0) == 0.75
    assert tc.lr_factor("time", 0, 4, 75.0, 60.0) == 0.0
    with pytest.raises(ValueError, match="time-budget"):
        tc.lr_factor("time", 0, 4, 1.0, None)
    assert tc.parse_runs(["normgraph:default", "muon:0.01,0.02", "adamw"]) == [
        ("normgraph", None), ("muon", 0.01), ("muon", 0.02), ("adamw", tc.DEFAULT_LRS["adamw"])]
    with pytest.raises(SystemExit):
        tc.parse_runs(["sgd:0.1"])


def test_full_corpus_leaves_out_tests_and_heldout_files() -> None:
    tc = load("gpu_train_compare")
    from normgraph.demo.data import HELDOUT_FILES, TRAIN_FILES
    files = tc.full_train_files()
    assert files == sorted(files) and set(TRAIN_FILES) <= set(files)
    assert not set(HELDOUT_FILES) & set(files)
    assert not any(set(Path(f).parts[:-1]) & tc.SKIP_DIRS for f in files)


def test_muon_gets_gpt2s_hidden_matrices() -> None:
    pytest.importorskip("transformers")
    tc = load("gpu_train_compare")
    model = tc.build_model(layers=2, d=32, heads=2, block=16, dropout=0.0)
    hidden = tc.hidden_matrices(model)
    assert len(hidden) == 4 * 2 and all(p.ndim == 2 for p in hidden)
    ids = {id(p) for p in hidden}
    assert id(model.transformer.wte.weight) not in ids and id(model.transformer.wpe.weight) not in ids


def test_training_comparison_is_fair(tmp_path) -> None:
    """Every optimizer starts from the same weights on the same batches, and the untimed
    warm-up leaves no trace: the whole trajectory is the same with or without it."""
    pytest.importorskip("transformers")
    tc = load("gpu_train_compare")
    runs = ["normgraph:default", "muon:default", "adamw:default"]
    warm = tc.main(["--tiny", "--steps", "5", "--warmup", "2", "--out", str(tmp_path / "a"), "--runs", *runs])
    cold = tc.main(["--tiny", "--steps", "5", "--warmup", "0", "--out", str(tmp_path / "b"), "--runs", *runs,
                    "--no-plot"])
    # the loss of the first step is the untrained model's on the first batch, for every optimizer
    torch.manual_seed(0)
    model = tc.build_model(2, 64, 2, 32, 0.0)
    x, y = next(tc.load_corpus("small").batches(8, 32, seed=0))
    with torch.no_grad():
        fresh = torch.nn.functional.cross_entropy(model(input_ids=x).logits.flatten(0, 1), y.flatten()).item()
    for a, b in zip(warm["runs"], cold["runs"]):
        assert a["label"] == b["label"] and len(a["losses"]) == 5
        assert a["losses"][0] == pytest.approx(fresh, abs=1e-5)
        assert a["losses"] == pytest.approx(b["losses"], abs=1e-5), a["label"]
        assert all(math.isfinite(v) for v in a["losses"]) and math.isfinite(a["heldout_loss"])
    ng = warm["runs"][0]
    assert ng["kind"] == "normgraph" and ng["lr"] == 0.25  # normgraph.compile's default lr
    assert ng["losses"][-1] < ng["losses"][0]
    out = tmp_path / "a"
    saved = json.loads((out / "train_compare.json").read_text())
    assert [r["label"] for r in saved["runs"]] == [r["label"] for r in warm["runs"]]
    assert saved["target"] is not None and all(r["time_to_target_s"] is not None for r in saved["runs"])
    rows = (out / "train_compare.csv").read_text().splitlines()
    assert rows[0] == "run,kind,lr,step,seconds,loss" and len(rows) == 1 + 3 * 5
    assert "| normgraph | 0.25 |" in (out / "train_compare.md").read_text()
    if importlib.util.find_spec("matplotlib"):
        assert (out / "train_compare.png").stat().st_size > 1000
    assert not (tmp_path / "b" / "train_compare.png").exists()


# --- profile_map.py ---------------------------------------------------------------------------

def test_kernel_table_from_gpu_events() -> None:
    """The GPU path, on events shaped as torch.profiler's: kernels summed by name, user
    annotations left out, cuBLAS/Triton-template kernels counted as matmul."""
    pm = load("profile_map")
    from torch.autograd import DeviceType

    def ev(name, us, device=DeviceType.CUDA, annotation=False):
        return SimpleNamespace(name=name, device_type=device, is_user_annotation=annotation,
                               time_range=SimpleNamespace(elapsed_us=lambda: us))
    events = [ev("sm90_xmma_gemm_bf16bf16_bf16f32", 30.0), ev("sm90_xmma_gemm_bf16bf16_bf16f32", 30.0),
              ev("nvjet_tst_128x256", 20.0), ev("triton_poi_fused_add_mul_0", 15.0),
              ev("Optimizer.step#NormGraphOptimizer.step", 500.0),  # GPU-side copy of a record_function
              ev("call", 400.0, annotation=True), ev("aten::bmm", 9.0, device=DeviceType.CPU),
              ev("Memset (Device)", 5.0)]
    times = pm.gpu_kernels(events)
    assert times == {"sm90_xmma_gemm_bf16bf16_bf16f32": (2, 60.0), "nvjet_tst_128x256": (1, 20.0),
                     "triton_poi_fused_add_mul_0": (1, 15.0), "Memset (Device)": (1, 5.0)}
    rows, busy, mm = pm.kernel_table(times, on_gpu=True, calls=2, top=2)
    assert busy == pytest.approx(50.0) and mm == pytest.approx(40.0)
    assert "| `sm90_xmma_gemm_bf16bf16_bf16f32` | 1 | 30.0 | 60.0% | matmul |" in rows
    assert rows[-1].startswith("| (2 more) | 1 | 10.0 | 20.0% |")


# --- gpu_check.sh -----------------------------------------------------------------------------

def test_every_cuda_only_test_is_selected_by_k_cuda() -> None:
    """gpu_check.sh runs `pytest -k cuda`: every test that skips without CUDA must say so in its name."""
    missed = []
    for path in (ROOT / "tests").glob("test_*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test"):
                text = " ".join(ast.unparse(d) for d in node.decorator_list)
                body = ast.unparse(node.body[0]) if node.body else ""
                if ("CUDA" in text or "cuda" in text or "cuda.is_available" in body) and "cuda" not in node.name:
                    missed.append(f"{path.name}::{node.name}")
    assert not missed, missed


def test_gpu_check_script_parses() -> None:
    subprocess.run(["bash", "-n", str(BENCH / "gpu_check.sh")], check=True)


def test_gpu_check_dry_run(tmp_path) -> None:
    """The whole plumbing on the CPU at tiny sizes: every part runs, OUTDIR holds at most the 8
    files the device tool brings back, and the raw tarball holds every part's output."""
    pytest.importorskip("transformers")
    out, raw = tmp_path / "out", tmp_path / "raw"
    env = dict(os.environ, CPU="1", PARTS="bench profile train", RAW_DIR=str(raw), PYTHON=sys.executable,
               OMP_NUM_THREADS="1")
    res = subprocess.run(["bash", str(BENCH / "gpu_check.sh"), str(out)], env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and {"gpu_check.log", "summary.txt", "raw.tar.gz", "bench.log"} <= set(files), files
    assert [line.split()[:2] for line in (out / "summary.txt").read_text().splitlines()] == [
        ["bench", "rc=0"], ["profile", "rc=0"], ["train", "rc=0"]]
    with tarfile.open(out / "raw.tar.gz") as tar:
        names = {n.removeprefix("./") for n in tar.getnames()}
    assert {"bench.json", "bench.log", "profile/profile_map.md", "profile/profile_step.md",
            "profile/trace_map.json.gz", "profile/gemm_rates.md", "profile/map_source.py", "train/train_compare.json",
            "train/train_compare.csv"} <= names, names
    bench = json.loads((raw / "bench.json").read_text())
    kinds = {r["kind"] for r in bench["rows"]}
    assert {"map", "step", "muon", "loop"} <= kinds
    default = [r for r in bench["rows"] if r["default"]]
    assert sorted(r["kind"] for r in default) == ["map", "step"]
    muon = next(r for r in bench["rows"] if r["kind"] == "muon")
    for r in default:  # Polar Express is more accurate than Muon's quintic in every family
        assert all(r["err"][f] <= muon["err"][f] for f in muon["err"]), r
    log = (out / "gpu_check.log").read_text()
    assert "# acceptance (issue 33" in log and "default step(): " in log
    assert "| `aten::bmm` |" in (raw / "profile" / "profile_map.md").read_text()  # the CPU table: operators
