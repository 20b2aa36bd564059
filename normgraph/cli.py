"""The `normgraph` command line: inspect a model's norms, export them, run the demo.

Errors are one line on stderr and exit code 1 (2 for usage errors); `--debug` shows the
traceback. MODEL is `module:factory`, `path/to/file.py:factory`, `path/to/file.py` (which
defines `build_model()` or `model`), or a saved annotations file (.json / .onnx). Instead of
MODEL, `--config path/config.json` or `--model-type llama --set num_hidden_layers=80 ...`
builds a transformers model on the meta device (no weights, nothing downloaded).
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import math
import sys
import traceback
from pathlib import Path
from typing import Any, Sequence

from . import __version__, api, io
from .analysis import SENSITIVITY_MODES, analyze
from .analysis.analyze import DEFAULT_SENSITIVITY

EXPORT_FORMATS = ("json", "onnx", "dot", "graphml", "nodelink", "svg", "png", "pdf")
SUFFIX_FORMAT = {".json": "json", ".onnx": "onnx", ".dot": "dot", ".gv": "dot", ".graphml": "graphml",
                 ".svg": "svg", ".png": "png", ".pdf": "pdf"}


class CLIError(Exception):
    """A user-facing error: printed as one line, no traceback."""


# ---------------------------------------------------------------- model specs

def load_object(spec: str) -> Any:
    """Resolve `module:attr`, `file.py:attr` or `file.py` (its `build_model` or `model`)."""
    target, sep, attr = spec.rpartition(":")
    if not sep or not attr.isidentifier():  # no attribute given (or a Windows drive colon)
        target, attr = spec, ""
    if target.endswith(".py") or "/" in target or "\\" in target:
        path = Path(target)
        if not path.is_file():
            raise CLIError(f"model file not found: {target}")
        module = _import_file(path)
    else:
        try:
            module = importlib.import_module(target)
        except Exception as e:
            raise CLIError(f"cannot import {target!r}: {type(e).__name__}: {e}") from e
    names = [attr] if attr else ["build_model", "model"]
    for name in names:
        if hasattr(module, name):
            return getattr(module, name)
    if attr:
        raise CLIError(f"{target} has no attribute {attr!r}")
    raise CLIError(f"{target} defines neither build_model() nor model; name one: {target}:FACTORY")


def _import_file(path: Path) -> Any:
    name = f"normgraph_user_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise CLIError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    sys.path.insert(0, str(path.resolve().parent))  # let the file import its neighbours
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise CLIError(f"importing {path} failed: {type(e).__name__}: {e}") from e
    finally:
        sys.path.remove(str(path.resolve().parent))
    return module


def build_model(spec: str) -> Any:
    """The `torch.nn.Module` named by `spec` (calling it if it is a factory)."""
    import torch

    obj = load_object(spec)
    if isinstance(obj, torch.nn.Module):
        return obj
    if callable(obj):
        try:
            obj = obj()
        except Exception as e:
            raise CLIError(f"calling {spec}() failed: {type(e).__name__}: {e}") from e
    if not isinstance(obj, torch.nn.Module):
        raise CLIError(f"{spec} gave a {type(obj).__name__}, not a torch.nn.Module")
    return obj


# ---------------------------------------------------------------- example inputs, masses

def parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise CLIError(f"bad --input-shape {text!r}: expected integers such as 2,16") from None
    if not shape or any(s <= 0 for s in shape):
        raise CLIError(f"bad --input-shape {text!r}: expected positive integers such as 2,16")
    return shape


def parse_masses(items: Sequence[str]) -> dict[str, float] | None:
    """`blocks=5,head=1` (repeatable) → {"blocks": 5.0, "head": 1.0}."""
    masses: dict[str, float] = {}
    for item in items:
        for part in filter(None, (p.strip() for p in item.split(","))):
            key, eq, value = part.partition("=")
            try:
                if not eq or not key:
                    raise ValueError
                masses[key.strip()] = float(value)
            except ValueError:
                raise CLIError(f"bad --masses entry {part!r}: expected NAME=NUMBER such as blocks=5") from None
            if not (math.isfinite(masses[key.strip()]) and masses[key.strip()] >= 0):
                raise CLIError(f"bad --masses entry {part!r}: a mass must be a finite number >= 0")
    return masses or None


def example_inputs(model: Any, shapes: Sequence[str], dtypes: Sequence[str]) -> tuple[Any, ...] | None:
    """Random example inputs: floats ~ N(0, 1); longs below the smallest embedding's size."""
    import torch

    if not shapes:
        return None
    if len(dtypes) not in (0, 1, len(shapes)):
        raise CLIError(f"give --input-dtype once or once per --input-shape ({len(shapes)} shapes, "
                       f"{len(dtypes)} dtypes)")
    dtypes = list(dtypes) or ["float"]
    if len(dtypes) == 1:
        dtypes = dtypes * len(shapes)
    vocab = min((m.num_embeddings for m in model.modules() if isinstance(m, torch.nn.Embedding)),
                default=2)
    gen = torch.Generator().manual_seed(0)
    out = []
    for text, dtype in zip(shapes, dtypes):
        shape = parse_shape(text)
        if dtype == "long":
            out.append(torch.randint(0, vocab, shape, generator=gen))
        else:
            out.append(torch.randn(shape, generator=gen))
    return tuple(out)


def check_inputs(model: Any, inputs: tuple[Any, ...], spec: str) -> None:
    """Run the model once, so that a model rejecting the inputs is reported as such (the
    analysis would otherwise fall back to module-level rules with only a warning)."""
    import torch

    try:
        with torch.no_grad():
            model(*inputs)
    except Exception as e:
        shapes = ", ".join(f"{tuple(x.shape)} {str(x.dtype).removeprefix('torch.')}" for x in inputs)
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CLIError(f"{spec} rejected the example inputs ({shapes}): {type(e).__name__}: {first}"
                       " (set --input-shape / --input-dtype)") from e


def config_model(args: argparse.Namespace) -> tuple[Any, tuple[Any, ...], dict[str, Any]]:
    """(weightless model, example args, example kwargs) for --config / --model-type."""
    try:
        from . import hf
        overrides = hf.parse_overrides(args.set)
        config = hf.load_config(args.config, model_type=args.model_type, overrides=overrides)
        model = hf.weightless_model(config, task=args.task)
        shape = parse_shape(args.input_shape[0]) if args.input_shape else None
        inputs, kwargs = hf.example_inputs(model, shape=shape)
    except (ImportError, ValueError, FileNotFoundError) as e:
        raise CLIError(str(e)) from e
    except Exception as e:  # a transformers model that cannot be built from this config
        raise CLIError(f"building the model failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    return model, inputs, kwargs


def norm_graph_for(args: argparse.Namespace) -> tuple[Any, Any, tuple[Any, ...] | None]:
    """(NormGraph, model or None, example inputs) for the MODEL argument (or --config /
    --model-type)."""
    from_config = args.config is not None or args.model_type is not None
    if not from_config and (args.set or args.task != "auto"):
        raise CLIError("--set and --task apply to --config / --model-type")
    if from_config:
        model, inputs, kwargs = config_model(args)
        try:
            ng = analyze(model, inputs, kwargs, masses=parse_masses(args.masses), sensitivity=args.sensitivity)
        except CLIError:
            raise
        except Exception as e:
            raise CLIError(f"analysing {type(model).__name__} failed: {type(e).__name__}: {e}") from e
        return ng, model, inputs
    suffix = Path(args.model).suffix.lower()
    if suffix in (".json", ".onnx") and ":" not in args.model:
        if not Path(args.model).is_file():
            raise CLIError(f"file not found: {args.model}")
        reader = io.load if suffix == ".json" else io.read_onnx_annotations
        return reader(args.model), None, None
    model = build_model(args.model)
    inputs = example_inputs(model, args.input_shape, args.input_dtype)
    if inputs is not None and any(p.is_meta for p in model.parameters()):  # a weightless model: meta inputs
        inputs = tuple(x.to("meta") for x in inputs)
    if inputs is not None:
        check_inputs(model, inputs, args.model)
    try:
        ng = analyze(model, inputs, masses=parse_masses(args.masses), sensitivity=args.sensitivity)
    except CLIError:
        raise
    except Exception as e:
        raise CLIError(f"analysing {args.model} failed: {type(e).__name__}: {e}") from e
    return ng, model, inputs


# ---------------------------------------------------------------- commands

def cmd_inspect(args: argparse.Namespace) -> int:
    ng, _, _ = norm_graph_for(args)
    print(ng)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    fmt = args.format or SUFFIX_FORMAT.get(Path(args.output).suffix.lower())
    if fmt is None:
        raise CLIError(f"cannot tell the format from {args.output!r}: pass --format "
                       f"({', '.join(EXPORT_FORMATS)})")
    ng, model, inputs = norm_graph_for(args)
    if fmt == "onnx":
        if model is None:
            raise CLIError("--format onnx needs a model (MODEL is an annotations file)")
        if any(p.is_meta for p in model.parameters()):
            raise CLIError("--format onnx needs weights, and this model is on the meta device: export "
                           "the annotations as json (or dot, graphml, ...) instead")
        if inputs is None:
            raise CLIError("--format onnx needs example inputs: pass --input-shape (and --input-dtype)")
        model.eval()  # export the inference graph (no dropout); the annotations do not depend on it
        try:
            api.export_onnx(model, inputs, args.output, norm_graph=ng)
        except Exception as e:
            raise CLIError(f"ONNX export failed: {type(e).__name__}: {str(e).splitlines()[0]}") from e
    elif fmt in ("svg", "png", "pdf"):
        path = Path(args.output)
        if path.suffix.lower() != f".{fmt}":
            path = path.with_suffix(f".{fmt}")
        io.draw(ng, path)
    else:
        io.GRAPH_WRITERS[fmt](ng, args.output)
    print(f"wrote {args.output} ({fmt})")
    return 0


def cmd_demo(argv: Sequence[str]) -> int:
    """Forward everything after `demo` to `normgraph.demo.main` (imported only now: it is heavy)."""
    try:
        from . import demo
    except ImportError as e:
        raise CLIError(f"the demo is not available: {e}") from e
    return int(demo.main(list(argv)) or 0)


# ---------------------------------------------------------------- parser

def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", nargs="?",
                   help="module:factory, path/to/file.py:factory, path/to/file.py (defines "
                        "build_model or model), or an annotations .json/.onnx file; or leave it out "
                        "and give --config / --model-type")
    hf_args = p.add_argument_group("a transformers model from its config, on the meta device (no weights)")
    hf_args.add_argument("--config", metavar="PATH",
                         help="a transformers config.json (or the folder holding it)")
    hf_args.add_argument("--model-type", metavar="TYPE",
                         help="a transformers model type (llama, gpt2, bert, mistral, t5, ...), with "
                              "its default config changed by --set")
    hf_args.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                         help="change one config setting, e.g. --set num_hidden_layers=80 (values read "
                              "as JSON: numbers, true/false/null, lists; else strings)")
    hf_args.add_argument("--task", default="auto", choices=("auto", "causal-lm", "masked-lm", "seq2seq-lm",
                                                             "image-classification", "sequence-classification",
                                                             "base"),
                         help="which model class: auto (default) takes the config's architectures, else the "
                              "first of seq2seq-lm, masked-lm, causal-lm, image-classification, base that fits")
    p.add_argument("--input-shape", action="append", default=[], metavar="SHAPE",
                   help="shape of one example input, e.g. 2,16 (repeat for several inputs; with "
                        "--config / --model-type the token ids' shape, default 1,16)")
    p.add_argument("--input-dtype", action="append", default=[], choices=("float", "long"),
                   help="dtype of the example inputs: once for all, or once per --input-shape "
                        "(long: token ids below the smallest nn.Embedding size)")
    p.add_argument("--sensitivity", choices=SENSITIVITY_MODES, default=DEFAULT_SENSITIVITY,
                   help="sensitivity mode (default: hybrid; scale: worst case everywhere; modula: modula's algebra exactly; "
                        "typical: paths combined in quadrature; hybrid: quadrature for plain sums "
                        "such as residual streams, worst case elsewhere)")
    p.add_argument("--masses", action="append", default=[], metavar="NAME=M,...",
                   help="masses by module-name prefix, e.g. blocks=5,head=1")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="normgraph", description=__doc__.split("\n")[0])
    parser.add_argument("--debug", action="store_true",
                        help="show tracebacks on errors (accepted anywhere on the line)")
    parser.add_argument("--version", action="version", version=f"normgraph {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("inspect", help="print the per-parameter norm table",
                       description="Analyse MODEL and print each parameter's kind, norm, mass, "
                                   "downstream sensitivity and budget, then the diagnostics.")
    _model_args(p)
    p.set_defaults(func=cmd_inspect)
    p = sub.add_parser("export", help="write annotations (json, onnx) or the graph (dot, graphml, ...)",
                       description="Analyse MODEL and write the result to -o PATH.")
    _model_args(p)
    p.add_argument("-o", "--output", required=True, metavar="PATH")
    p.add_argument("--format", choices=EXPORT_FORMATS,
                   help="json: annotations; onnx: model + annotations; dot/graphml/nodelink: the "
                        "graph; svg/png/pdf: a drawing (default: from the suffix of PATH)")
    p.set_defaults(func=cmd_export)
    sub.add_parser("demo", add_help=False, help="normgraph vs AdamW vs Muon on a small GPT "
                                                "(`normgraph demo --help` for its options)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        # `demo` takes its own options: forward the rest untouched instead of parsing it here.
        rest = [a for a in argv if a != "--debug"]
        if rest and rest[0] == "demo":
            return cmd_demo(rest[1:])
        parser = make_parser()
        args = parser.parse_args(rest)
        if args.command in ("inspect", "export"):
            from_config = args.config is not None or args.model_type is not None
            if not from_config and args.model is None:
                parser.error("the following arguments are required: MODEL (or a transformers config: "
                             "--config PATH or --model-type TYPE)")
            if from_config and args.model is not None:
                parser.error("give MODEL or a transformers config (--config / --model-type), not both")
        return args.func(args)
    except CLIError as e:
        if debug:
            traceback.print_exc()
        print(f"normgraph: error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `normgraph inspect ... | head`: the reader left, nothing to report
        sys.stdout = None  # type: ignore[assignment]  # keep the interpreter from flushing again
        return 0
    except KeyboardInterrupt:
        print("normgraph: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # anything unexpected: still one line unless --debug
        if debug:
            traceback.print_exc()
        message = str(e).splitlines()[0] if str(e) else ""
        print(f"normgraph: error: {type(e).__name__}: {message}", file=sys.stderr)
        return 1
