"""The demo's data, model and training loop, at a size that runs in seconds."""
from __future__ import annotations

import math

import pytest
import torch

from normgraph import demo
from normgraph.demo.data import HELDOUT_FILES, TRAIN_FILES, Corpus, stdlib_dir
from normgraph.demo.models import GPT, GPTConfig

TINY = GPTConfig(block_size=16, n_layer=1, n_head=2, d_model=32)


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    return Corpus.load()


def test_corpus_files_exist_and_are_disjoint(corpus: Corpus) -> None:
    assert not set(TRAIN_FILES) & set(HELDOUT_FILES)
    for name in TRAIN_FILES + HELDOUT_FILES:
        assert (stdlib_dir() / name).is_file(), name
    assert len(corpus.train) > 200_000 and len(corpus.heldout) > 50_000
    assert corpus.train.dtype == torch.uint8


def test_batches_are_deterministic(corpus: Corpus) -> None:
    a = corpus.batches(4, 16, seed=3)
    b = corpus.batches(4, 16, seed=3)
    for _ in range(3):
        (xa, ya), (xb, yb) = next(a), next(b)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert xa.shape == (4, 16) and torch.equal(xa[:, 1:], ya[:, :-1])


def test_gpt_forward_and_residual_scale() -> None:
    model = GPT(GPTConfig(block_size=16, n_layer=4, n_head=2, d_model=32))
    assert model.blocks[0].scale == pytest.approx(0.25)
    logits = model(torch.randint(0, 256, (2, 16)))
    assert logits.shape == (2, 16, 256)


def test_muon_gets_only_hidden_matrices() -> None:
    model = GPT(TINY)
    opt = demo.make_optimizer("muon", model, 0.02, torch.zeros(1, 16, dtype=torch.long))
    muon, adamw = opt.opts
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    n_muon = sum(len(g["params"]) for g in muon.param_groups)
    n_adam = sum(len(g["params"]) for g in adamw.param_groups)
    assert n_muon == 4  # qkv, proj, fc, out
    assert n_muon + n_adam == len(list(model.parameters()))


@pytest.mark.parametrize("name", demo.OPTIMIZERS)
def test_each_optimizer_trains(corpus: Corpus, name: str) -> None:
    lr = demo.DEFAULT_LRS[name]
    r = demo.train(name, lr, TINY, corpus, steps=8, batch_size=4, progress=False, heldout_batches=1)
    assert len(r.losses) == 8 and all(math.isfinite(x) for x in r.losses)
    assert math.isfinite(r.heldout_loss)
    assert r.losses[-1] < r.losses[0]  # 8 steps from a random init always make progress


def test_normgraph_beats_adamw_at_the_same_step_count(corpus: Corpus) -> None:
    """Issue 3's training check, kept quick: a 2-layer byte GPT, 120 steps, same init and data,
    each optimizer at the lr the demo's sweep chose (normgraph 0.25 since the "scale" mode).
    normgraph ends ≥0.15 nats lower on train (mean of the last 10 steps) and ≥0.1 on held-out
    loss. The corpus is the running Python's standard library, so the margins depend on its
    version; seed 0 gave train / held-out margins 0.24 / 0.20 (3.11), 0.20 / 0.13 (3.10),
    0.19 / 0.14 (3.12), 0.18 / 0.15 (3.13) (at 60 steps lr 0.25 is still behind)."""
    cfg = GPTConfig(d_model=64, n_layer=2, block_size=32)
    runs = {n: demo.train(n, demo.DEFAULT_LRS[n], cfg, corpus, steps=120, batch_size=16,
                          progress=False, heldout_batches=2) for n in ("normgraph", "adamw")}
    train = {n: sum(r.losses[-10:]) / 10 for n, r in runs.items()}
    assert train["normgraph"] < train["adamw"] - 0.15, train
    assert runs["normgraph"].heldout_loss < runs["adamw"].heldout_loss - 0.1


def test_same_init_and_data_for_every_optimizer(corpus: Corpus) -> None:
    """Step-0 losses agree: same seed → same init and same first batch."""
    firsts = {n: demo.train(n, demo.DEFAULT_LRS[n], TINY, corpus, steps=1, batch_size=4,
                            progress=False, heldout_batches=0).losses[0] for n in demo.OPTIMIZERS}
    assert len({round(v, 5) for v in firsts.values()}) == 1, firsts


def test_demo_main_writes_table_and_png(tmp_path, capsys) -> None:
    png = tmp_path / "curves.png"
    assert demo.main(["--tiny", "--steps", "3", "--no-progress", "--out", str(png)]) == 0
    out = capsys.readouterr().out
    for name in demo.OPTIMIZERS:
        assert f"| {name} |" in out
    assert "held-out loss" in out and str(png.resolve()) in out
    assert png.stat().st_size > 1000


def test_cli_demo_subcommand(tmp_path, capsys) -> None:
    from normgraph import cli
    png = tmp_path / "c.png"
    rc = cli.main(["demo", "--tiny", "--steps", "2", "--no-progress", "--optimizers", "normgraph",
                   "--out", str(png)])
    assert rc in (0, None)
    assert "| normgraph |" in capsys.readouterr().out and png.exists()


def test_muon_baseline_runs_in_fp32_without_native_bf16(corpus: Corpus, monkeypatch) -> None:
    """On a CPU without native bf16 (forced here) the demo's Muon+AdamW baseline runs its
    Newton–Schulz in fp32, as normgraph's map does, and the demo's table says so."""
    from normgraph.codegen import orthogonalizers
    from normgraph.demo import baselines

    monkeypatch.setenv("NORMGRAPH_CPU_BF16", "0")
    orthogonalizers.cpu_has_fast_bf16.cache_clear()
    try:
        seen: list[torch.dtype] = []
        real = baselines._newton_schulz
        monkeypatch.setattr(baselines, "_newton_schulz",
                            lambda g, c, n, e, dtype: seen.append(dtype) or real(g, c, n, e, dtype))
        r = demo.train("muon", 0.02, TINY, corpus, steps=2, batch_size=4, progress=False, heldout_batches=1)
        n = demo.train("normgraph", 0.25, TINY, corpus, steps=1, batch_size=4, progress=False, heldout_batches=0)
        assert seen and set(seen) == {torch.float32}
        assert r.dtype == "fp32" and n.dtype == "fp32"
        assert "| fp32 |" in demo.results_table([r]) and "native bf16 no" in demo.run.machine_line("cpu")
        assert demo.train("adamw", 1e-3, TINY, corpus, steps=1, batch_size=4, progress=False,
                          heldout_batches=0).dtype == "-"
    finally:
        monkeypatch.delenv("NORMGRAPH_CPU_BF16")
        orthogonalizers.cpu_has_fast_bf16.cache_clear()


def test_muon_iteration_in_fp32_is_torchs_in_more_precision() -> None:
    """The fp32 iteration is torch.optim.Muon's own (same coefficients and steps): it agrees
    with torch's bf16 result to bf16 precision and with an fp64 run more closely than that."""
    import torch.optim._muon as tm

    from normgraph.demo import baselines

    g = torch.randn(48, 96, generator=torch.Generator().manual_seed(0))
    coeffs, steps, eps = (3.4445, -4.7750, 2.0315), 5, 1e-7
    ours = baselines._newton_schulz(g, coeffs, steps, eps, torch.float32)
    exact = baselines._newton_schulz(g.double(), coeffs, steps, eps, torch.float64)
    torchs = tm._zeropower_via_newtonschulz(g, coeffs, steps, eps).float()
    assert (ours.double() - exact).abs().max() < 1e-4
    assert (torchs - ours).abs().max() < 0.05
    assert (torchs.double() - exact).abs().max() > (ours.double() - exact).abs().max()
