"""The zoo (benchmarks/zoo.py), kept fast: every family builds, analyses and steps at a tiny
size; the patterns the zoo brings are read as they should be; the scoring and the sweep
extension do what the table claims. The full zoo is the benchmark, not a test."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

import normgraph

pytest.importorskip("transformers")
pytest.importorskip("sklearn")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import zoo  # noqa: E402
from zoo_families import FAMILIES, TASKS  # noqa: E402

TINY = zoo.Protocol(layers=2, width=64, block=16, batch=2, steps=3, vision_steps=3, vision_batch=8,
                    vision_seeds=(0,))
#: parameters that no rule reads as a matrix, table, gain or bias, named in the diagnostics
KNOWN_FALLBACKS = {"deberta_v2": ("rel_embeddings",), "swin": ("relative_position_bias_table",),
                   "beit": ("relative_position_bias_table",), "dinov2": ("mask_token",)}


def example(name: str):
    fam = FAMILIES[name]
    from normgraph.demo.data import Corpus
    corpus = None if fam.task == "vision" else Corpus.load()
    torch.manual_seed(0)
    model = fam.build(TINY.layers, TINY.width, TINY.block)
    return fam, model, zoo._example(fam, TINY, corpus, 0)


def test_the_zoo_has_the_families_and_splits_the_issue_asks_for():
    tasks = {f.task for f in FAMILIES.values()}
    assert tasks == set(TASKS)
    text = [f for f in FAMILIES.values() if f.task != "vision"]
    assert len(text) >= 20
    holdout = [f for f in FAMILIES.values() if f.split == "holdout"]
    assert len(holdout) >= len(FAMILIES) // 4  # a quarter held back, fixed before any training
    assert {f.name for f in FAMILIES.values() if f.split == "dev"} == {"gpt2", "llama", "bert", "vit", "resnet"}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_family_analyses_and_steps(name):
    """Every parameter is an atom with a finite positive budget; fallbacks are only the known
    ones (and are named in the diagnostics); one step of the default moves every atom."""
    fam, model, ex = example(name)
    opt = normgraph.compile(model, None, ex, compile_mode="eager")
    ng = opt.norm_graph
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(ng.atoms) == sorted(trainable)
    assert all(math.isfinite(a.budget) and a.budget > 0 for a in ng.atoms.values() if a.mass > 0)
    fallbacks = [n for n, a in ng.atoms.items() if a.kind == "fallback"]
    assert all(any(k in n for k in KNOWN_FALLBACKS.get(name, ())) for n in fallbacks), fallbacks
    assert set(fallbacks) <= set(ng.diagnostics.fallbacks) | set(ng.diagnostics.unreached)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    if fam.task == "vision":
        x, y = zoo._digits()[:2]
        loss = torch.nn.functional.cross_entropy(model(pixel_values=x[:8]).logits, y[:8])
    else:
        ids = ex["input_ids"]
        loss = model(**ex).logits.float().logsumexp(-1).mean() - 0 * ids.sum()
    loss.backward()
    opt.step()
    moved = [n for n, p in model.named_parameters() if p.grad is not None and not torch.equal(p, before[n])]
    assert moved, "nothing moved"


FUSED = {"gpt2": "c_attn.weight", "gpt_neox": "query_key_value.weight", "falcon": "query_key_value.weight",
         "bloom": "query_key_value.weight", "codegen": "qkv_proj.weight", "phi3": "qkv_proj.weight",
         "mpt": "Wqkv.weight"}


@pytest.mark.parametrize("name", sorted(FUSED))
def test_fused_qkv_projections_weigh_three_matrices(name):
    _, model, ex = example(name)
    ng = normgraph.analyze(model, None, ex)
    fused = [a for n, a in ng.atoms.items() if n.endswith(FUSED[name])]
    assert fused and all("3 parts" in a.note for a in fused)


#: (value projection or fused q/k/v, the attention's output projection) in each block
WRITTEN = {"bloom": ("query_key_value", "self_attention.dense"), "mpt": ("Wqkv", "out_proj"),
           "gpt_neo": ("v_proj", "out_proj"), "gemma2": ("v_proj", "o_proj"),
           "roformer": ("self.value", "attention.output.dense"), "deberta_v2": ("value_proj", "attention.output.dense")}


@pytest.mark.parametrize("name", sorted(WRITTEN))
def test_attention_written_out_reads_as_sdpa(name):
    """Attention written op by op: v counts a third of what the output projection sees (a
    fused q/k/v matrix sums its three thirds), as with SDPA; counted path by path, v counted
    a whole and the fused matrix three."""
    _, model, ex = example(name)
    ng = normgraph.analyze(model, None, ex)
    reader, out = WRITTEN[name]
    share = 1.0 if reader in ("query_key_value", "Wqkv") else 1 / 3
    for i in range(TINY.layers):
        def atom(part):
            return next(a for n, a in ng.atoms.items() if f".{i}." in n and part in n and n.endswith("weight"))
        assert atom(reader).downstream == pytest.approx(atom(out).downstream * share, rel=1e-6)


def test_verdicts_and_sweep_extension():
    s = zoo.Score("f", "causal", "select", (2.00, 2.10), 1.0, (2.004, 0.004, 2.10, 0.004), (1.99, 0.04, 2.09, 0.04))
    assert s.verdict() == {"adamw": True, "muon_02": True, "muon_05": True, "lr": True}
    worse = zoo.Score("f", "causal", "select", (2.10, 2.2), 4.0, (2.0, 0.004, 2.1, 0.004), (2.0, 0.04, 2.1, 0.04))
    assert worse.verdict() == {"adamw": False, "muon_02": False, "muon_05": False, "lr": False}
    # a best lr at the end of the sweep pulls in the next grid point, on that side only
    fam = FAMILIES["gpt2"]
    runs = {("gpt2", "adamw", lr, 0): zoo.Run("gpt2", "adamw", lr, 0, train=t, held=t)
            for lr, t in ((0.002, 2.5), (0.004, 2.6), (0.008, 2.7))}
    assert zoo._extensions(runs, fam, "adamw", (0,)) == [0.001]
    runs[("gpt2", "adamw", 0.001, 0)] = zoo.Run("gpt2", "adamw", 0.001, 0, train=2.55, held=2.55)
    assert zoo._extensions(runs, fam, "adamw", (0,)) == []


def test_the_normgraph_sweep_runs_the_multiples_asked_for():
    fams = [FAMILIES["gpt2"]]
    mults = lambda sweep: [m for f, k, m, s in zoo.schedule(fams, TINY, ("normgraph",), sweep)]  # noqa: E731
    assert mults(True) == [0.5, 1.0, 2.0]
    assert mults(False) == [1.0]
    # the default sweep reaches ¼ or 4 only while the best is at that end, and no further
    runs = {("gpt2", "normgraph", m, 0): zoo.Run("gpt2", "normgraph", m, 0, train=t, held=t)
            for m, t in ((0.5, 2.3), (1.0, 2.2), (2.0, 2.1))}
    assert zoo._extensions(runs, fams[0], "normgraph", (0,)) == [4.0]
    runs[("gpt2", "normgraph", 4.0, 0)] = zoo.Run("gpt2", "normgraph", 4.0, 0, train=2.0, held=2.0)
    assert zoo._extensions(runs, fams[0], "normgraph", (0,)) == []
    assert mults((0.5, 1.0, 2.0)) == [0.5, 1.0, 2.0]


def test_the_quick_zoo_runs_end_to_end(tmp_path, capsys):
    """The command itself, at the tiny protocol, two families, one job: a table with a row each."""
    out = tmp_path / "table.md"
    assert zoo.main(["--quick", "--families", "llama", "resnet", "--no-sweep", "--jobs", "1",
                     "--cache", str(tmp_path / "runs.json"), "--out", str(out)]) == 0
    text = out.read_text()
    assert "| llama | causal | dev |" in text and "| resnet | vision | dev |" in text
    assert (tmp_path / "runs.json").exists()
    # a second run reads every result from the cache
    assert zoo.main(["--quick", "--families", "llama", "resnet", "--no-sweep", "--jobs", "1",
                     "--cache", str(tmp_path / "runs.json")]) == 0
    assert "  llama" not in capsys.readouterr().out.split("# zoo:")[-1].split("| family")[0]


def test_calibration_reads_the_best_of_a_sweep_as_a_parabola_in_log_lr():
    """`zoo_calibration.log_argmin`: the vertex of the parabola through the best point and its
    neighbours (in log2 of the lr), the end point when the best is at an end."""
    import zoo_calibration
    curve = {2.0 ** k: (k - 0.3) ** 2 for k in range(-2, 3)}  # a parabola with its vertex at 0.3
    assert zoo_calibration.log_argmin(curve) == pytest.approx(0.3)
    assert zoo_calibration.log_argmin({0.5: 1.0, 1.0: 2.0, 2.0: 3.0}) == -1.0
    assert zoo_calibration.log_argmin({0.5: 3.0, 1.0: 2.0, 2.0: 1.0}) == 1.0


def test_the_adaptation_probe_raises_the_lr_of_an_atom_whose_steps_keep_lining_up():
    """`zoo_probes.AdaptedLrs`: on a loss whose gradient never changes (linear in the weights),
    each update (the gradient's dual, orthogonalised) lines up with the next gradient (a
    positive cosine), so each factor grows by exp(β·cos) per step until the cap; the param
    groups' own lrs are left as they were after each step."""
    import zoo_probes
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8, bias=False), torch.nn.Linear(8, 4, bias=False))
    opt = normgraph.compile(model, (torch.randn(2, 8),), compile_mode="eager", weight_decay=0.0)
    probe = zoo_probes.AdaptedLrs(opt, beta=0.5, matrices_only=False, cap=2.0)
    lrs = [g["lr"] for g in opt.param_groups]
    target = torch.randn(4, 8)
    for _ in range(4):
        probe.zero_grad()
        loss = sum((p * t).sum() for p, t in zip(model.parameters(), (target.T.repeat(1, 2)[:8], target)))
        loss.backward()
        probe.step()
    assert [g["lr"] for g in opt.param_groups] == lrs
    assert all(f == pytest.approx(2.0) for f in probe.factor.values())  # exp(0.5)^3 > 2: capped
