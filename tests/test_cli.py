"""The command line, run as `python -m normgraph ...` in a subprocess (as a user would)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

import normgraph
from normgraph import cli

REPO = Path(__file__).resolve().parents[1]

MODEL_FILE = '''
import torch

class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(10, 8)
        self.blocks = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8))
        self.head = torch.nn.Linear(8, 10, bias=False)

    def forward(self, idx):
        return self.head(self.blocks(self.emb(idx)))

def build_model():
    return Net()

def mlp():
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))

def broken():
    raise RuntimeError("factory exploded")

not_a_model = 3
'''


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("cli")
    (d / "tinymodels.py").write_text(MODEL_FILE)
    (d / "variable.py").write_text("import torch\nmodel = torch.nn.Linear(3, 2)\n")
    (d / "crashes.py").write_text("import torch\nraise ImportError('no such thing: flux_capacitor')\n")
    return d


def run(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(workdir)]),
               PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "normgraph", *args], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=300)


def in_process(workdir: Path, monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """`cli.main(args)` in this process (no interpreter start-up): (exit code, stdout, stderr)."""
    monkeypatch.chdir(workdir)
    monkeypatch.syspath_prepend(str(workdir))
    try:
        code = cli.main(list(args))
    except SystemExit as e:  # argparse: --help, usage errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_clean_error(code: int, stderr: str, *fragments: str) -> None:
    assert code != 0
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("normgraph: error:")]
    assert len(errors) == 1, stderr
    for fragment in fragments:
        assert fragment in errors[0]


# ---------------------------------------------------------------- as a subprocess

@pytest.mark.parametrize("args", [["--help"], ["demo", "--help"]])
def test_help(workdir, args):
    proc = run(workdir, *args)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: normgraph")


def test_inspect_file_factory(workdir):
    proc = run(workdir, "inspect", "tinymodels.py:build_model", "--input-shape", "2,5",
               "--input-dtype", "long")
    assert proc.returncode == 0, proc.stderr
    assert " atoms (" in proc.stdout.splitlines()[0]  # the one-line summary
    assert proc.stdout.splitlines()[2].split()[:3] == ["parameter", "kind", "shape"]
    for name in ("emb.weight", "blocks.0.weight", "blocks.2.bias", "head.weight", "total mass"):
        assert name in proc.stdout


def test_export_json_with_masses(workdir):
    proc = run(workdir, "export", "tinymodels.py", "--input-shape", "2,5", "--input-dtype", "long",
               "--masses", "blocks=5,head=2", "-o", "t.json")
    assert proc.returncode == 0, proc.stderr
    ng = normgraph.load(workdir / "t.json")
    assert sum(a.mass for n, a in ng.atoms.items() if n.startswith("blocks.")) == pytest.approx(5)
    assert ng.atoms["head.weight"].mass == pytest.approx(2)


def test_export_onnx(workdir):
    proc = run(workdir, "export", "tinymodels:mlp", "--input-shape", "2,3", "-o", "m.onnx")
    assert proc.returncode == 0, proc.stderr
    onnx.checker.check_model(onnx.load(str(workdir / "m.onnx")), full_check=True)
    assert set(normgraph.read_onnx_annotations(workdir / "m.onnx").atoms) == {
        "0.weight", "0.bias", "2.weight", "2.bias"}


@pytest.mark.parametrize("args, fragments", [
    (["inspect", "nowhere.py:f"], ["model file not found: nowhere.py"]),
    (["inspect", "crashes.py"], ["importing crashes.py failed", "flux_capacitor"]),
    (["inspect", "tinymodels:mlp", "--input-shape", "2,7"], ["rejected the example inputs", "(2, 7)"]),
])
def test_errors_as_subprocess(workdir, args, fragments):
    proc = run(workdir, *args)
    assert_clean_error(proc.returncode, proc.stderr, *fragments)


def test_debug_shows_the_traceback(workdir):
    proc = run(workdir, "inspect", "tinymodels:broken", "--debug")  # accepted anywhere on the line
    assert proc.returncode != 0 and "Traceback" in proc.stderr


# ---------------------------------------------------------------- in process (same code path)

@pytest.mark.parametrize("command", ["inspect", "export"])
def test_subcommand_help(workdir, monkeypatch, capsys, command):
    code, out, _ = in_process(workdir, monkeypatch, capsys, command, "--help")
    assert code == 0 and out.startswith(f"usage: normgraph {command}") and "--input-shape" in out


def test_inspect_module_factory_and_default_names(workdir, monkeypatch, capsys):
    code, out, err = in_process(workdir, monkeypatch, capsys, "inspect", "tinymodels:mlp", "--input-shape", "2,3")
    assert code == 0, err
    assert "0.weight" in out and "2.bias" in out
    code, out, err = in_process(workdir, monkeypatch, capsys, "inspect", "variable.py", "--input-shape", "4,3")
    assert code == 0, err  # a file that defines `model`
    assert "weight" in out


def test_inspect_saved_annotations(workdir, monkeypatch, capsys):
    code, _, err = in_process(workdir, monkeypatch, capsys, "export", "tinymodels:mlp", "--input-shape", "2,3",
                              "-o", "mlp.json")
    assert code == 0, err
    code, out, err = in_process(workdir, monkeypatch, capsys, "inspect", "mlp.json")
    assert code == 0, err
    assert "2.weight" in out


@pytest.mark.parametrize("fmt, check", [
    ("graphml", lambda p: p.read_text().startswith("<?xml")),
    ("dot", lambda p: p.read_text().startswith("digraph")),
    ("nodelink", lambda p: "edges" in json.loads(p.read_text())),
    ("svg", lambda p: "<svg" in p.read_text()),
])
def test_export_graph_formats(workdir, monkeypatch, capsys, fmt, check):
    out = workdir / f"graph.{fmt}"
    code, _, err = in_process(workdir, monkeypatch, capsys, "export", "tinymodels:mlp", "--input-shape", "2,3",
                              "--format", fmt, "-o", str(out))
    assert code == 0, err
    assert check(out)


@pytest.mark.parametrize("args, fragments", [
    (["inspect", "no_such_module_xyz:f"], ["cannot import 'no_such_module_xyz'"]),
    (["inspect", "tinymodels:nothing"], ["has no attribute 'nothing'"]),
    (["inspect", "tinymodels:broken"], ["factory exploded"]),
    (["inspect", "tinymodels:not_a_model"], ["not a torch.nn.Module"]),
    (["inspect", "tinymodels:build_model", "--input-shape", "2,5"], ["rejected the example inputs", "float32"]),
    (["inspect", "tinymodels:mlp", "--input-shape", "2,x"], ["bad --input-shape '2,x'"]),
    (["inspect", "tinymodels:mlp", "--masses", "blocks"], ["bad --masses entry 'blocks'"]),
    (["inspect", "tinymodels:mlp", "--masses", "blocks=nan"], ["bad --masses entry 'blocks=nan'", "finite"]),
    (["inspect", "tinymodels:mlp", "--masses", "blocks=inf"], ["bad --masses entry 'blocks=inf'", "finite"]),
    (["inspect", "tinymodels:mlp", "--input-shape", "2,3", "--masses", "nope=1"], ["match no trainable parameter"]),
    (["inspect", "missing.json"], ["file not found: missing.json"]),
    (["export", "tinymodels:mlp", "-o", "x.onnx"], ["needs example inputs"]),
    (["export", "tinymodels:mlp", "-o", "x.txt"], ["cannot tell the format"]),
])
def test_errors_are_one_line(workdir, monkeypatch, capsys, args, fragments):
    code, _, err = in_process(workdir, monkeypatch, capsys, *args)
    assert_clean_error(code, err, *fragments)


def test_usage_error_exit_code(workdir, monkeypatch, capsys):
    code, _, err = in_process(workdir, monkeypatch, capsys, "inspect")
    assert code == 2 and "MODEL" in err


def test_demo_forwards_its_arguments(monkeypatch):
    """`normgraph demo ARGS` calls normgraph.demo.main(ARGS) untouched (no training here)."""
    from normgraph import demo

    seen = []
    monkeypatch.setattr(demo, "main", lambda argv: seen.append(argv) or 0)
    assert cli.main(["demo", "--steps", "3", "--sweep"]) == 0
    assert seen == [["--steps", "3", "--sweep"]]


def test_parse_helpers():
    assert cli.parse_shape("2,16") == (2, 16)
    assert cli.parse_masses(["blocks=5,head=1", "emb=0.5"]) == {"blocks": 5.0, "head": 1.0, "emb": 0.5}
    assert cli.parse_masses([]) is None
