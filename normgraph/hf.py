"""transformers models from a config, without weights: what normgraph would do to a model
before any weights exist (docs/large_models.md).

    cfg = normgraph.hf.load_config(model_type="llama", overrides={"num_hidden_layers": 80, ...})
    model = normgraph.hf.weightless_model(cfg)          # parameters on the meta device
    args, kwargs = normgraph.hf.example_inputs(model)   # meta token ids (or pixels)
    ng = normgraph.analyze(model, args, kwargs)

Nothing is downloaded: a config comes from a `config.json` (or the folder holding it) or from
a model type and overrides (`transformers.AutoConfig.for_model`). The parameters are meta
tensors (shapes, no data, no memory); the floating-point buffers a model computes when it is
built (RoPE frequencies, a stored √d embedding scale) are materialised on the CPU and
initialised by the model's own `initialize_weights`, so that the analysis reads the same
constants as with weights. A buffer that initialisation leaves unset stays on meta (the
analysis then counts it as an unknown constant and says so in its notes).
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

#: `task` → the transformers Auto class that builds it.
TASKS = {
    "causal-lm": "AutoModelForCausalLM",
    "masked-lm": "AutoModelForMaskedLM",
    "seq2seq-lm": "AutoModelForSeq2SeqLM",
    "image-classification": "AutoModelForImageClassification",
    "sequence-classification": "AutoModelForSequenceClassification",
    "base": "AutoModel",
}
#: The order in which `task="auto"` tries the Auto classes when the config names no
#: architecture transformers has (an encoder–decoder's seq2seq head before its causal one,
#: BERT's masked head before its decoder variant).
AUTO_ORDER = ("seq2seq-lm", "masked-lm", "causal-lm", "image-classification", "base")


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as e:
        raise ImportError("building a model from a config needs transformers: pip install transformers "
                          "(or normgraph[hf])") from e
    return transformers


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """`["num_hidden_layers=80", "rope_scaling=null", "hidden_act=silu"]` → a dict: each value
    read as JSON (numbers, true/false/null, lists, objects), else kept as a string."""
    out: dict[str, Any] = {}
    for item in items:
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ValueError(f"bad override {item!r}: expected KEY=VALUE such as num_hidden_layers=80")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def load_config(path: str | os.PathLike | None = None, *, model_type: str | None = None,
                overrides: Mapping[str, Any] | None = None) -> Any:
    """A transformers config from a `config.json` (or its folder) or from a model type, with
    `overrides` passed to its constructor (so that derived settings follow: overriding
    `num_attention_heads` also sets an unset `num_key_value_heads`). A key that neither the
    type's defaults nor the file has is refused: a typo must not pass silently."""
    transformers = _transformers()
    if (path is None) == (model_type is None):
        raise ValueError("give a config path or a model type (one of them)")
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if p.is_dir():
            p = p / "config.json"
        if not p.is_file():
            raise FileNotFoundError(f"no config file at {p}")
        try:
            raw = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{p} is not JSON: {e}") from e
        model_type = raw.get("model_type")
        if not model_type:
            raise ValueError(f"{p} names no model_type; pass --model-type with --set overrides instead")
    known = set(_for_model(transformers, model_type, {}).to_dict()) | set(raw)
    unknown = sorted(k for k in (overrides or {}) if k not in known)
    if unknown:
        raise ValueError(f"a {model_type} config has no setting(s) {unknown} (it has e.g. "
                         f"{', '.join(sorted(k for k in known if not k.startswith('_'))[:10])}, …)")
    return _for_model(transformers, model_type, {**raw, **(overrides or {})})


def _for_model(transformers: Any, kind: str, values: dict[str, Any]) -> Any:
    values = {k: v for k, v in values.items() if k not in ("model_type", "transformers_version")}
    if kind not in transformers.CONFIG_MAPPING:
        known = sorted(transformers.CONFIG_MAPPING.keys())
        close = [k for k in known if kind.lower().replace("-", "_") in k][:6]
        raise ValueError(f"unknown model type {kind!r} for transformers {transformers.__version__}"
                         + (f" (did you mean {', '.join(close)}?)" if close else "")
                         + f"; {len(known)} types are known, e.g. llama, gpt2, bert, mistral, t5")
    return transformers.AutoConfig.for_model(kind, **values)


def auto_class(config: Any, task: str = "auto") -> Any:
    """The class that builds `config` for `task`: "auto" takes the config's own
    `architectures[0]` where transformers has it, else the first of `AUTO_ORDER` that maps the
    config; a named task takes its Auto class (`TASKS`)."""
    transformers = _transformers()
    if task != "auto":
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; choose from auto, {', '.join(TASKS)}")
        cls = getattr(transformers, TASKS[task])
        if type(config) not in cls._model_mapping:
            raise ValueError(f"{type(config).__name__} has no {task} model in transformers "
                             f"{transformers.__version__} ({TASKS[task]})")
        return cls
    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if isinstance(cls, type):
            return cls
    for t in AUTO_ORDER:
        cls = getattr(transformers, TASKS[t])
        if type(config) in cls._model_mapping:
            return cls
    raise ValueError(f"transformers has no model class for {type(config).__name__}")


def weightless_model(config: Any, task: str = "auto") -> torch.nn.Module:
    """The model of `config` with its parameters on the meta device and its floating-point
    buffers computed on the CPU (module docstring). In eval mode (no dropout)."""
    cls = auto_class(config, task)
    with torch.device("meta"):
        model = cls.from_config(config) if cls.__name__.startswith("Auto") else cls(config)
    _materialise_buffers(model)
    return model.eval()


def _materialise_buffers(model: torch.nn.Module) -> None:
    """Float buffers onto the CPU, set by the model's own initialisation; the ones it leaves
    unset (still NaN) go back to meta."""
    init = getattr(model, "initialize_weights", None)
    if init is None:
        return
    owners: list[tuple[torch.nn.Module, str, torch.Tensor]] = []
    for mod in model.modules():
        for name, buf in mod._buffers.items():
            if buf is not None and buf.is_meta and buf.is_floating_point():
                mod._buffers[name] = torch.full(buf.shape, float("nan"), dtype=buf.dtype)
                owners.append((mod, name, buf))
    if not owners:
        return
    for mod in {id(m): m for m, _, _ in owners}.values():
        mod.__dict__.pop("_is_hf_initialized", None)  # so that initialize_weights visits it again
    try:
        init()
    except Exception:  # noqa: BLE001 - a model whose init cannot run here keeps meta buffers
        for mod, name, meta in owners:
            mod._buffers[name] = meta
        return
    for mod, name, meta in owners:
        if bool(torch.isnan(mod._buffers[name]).any()):
            mod._buffers[name] = meta


def example_inputs(model: torch.nn.Module, batch: int = 1, seq: int = 16,
                   shape: Sequence[int] | None = None) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Example inputs on the meta device for a transformers model: token ids (batch, seq) (or
    `shape`), or pixels for a vision model; an encoder–decoder also gets decoder ids."""
    config = getattr(model, "config", None)
    main = getattr(model, "main_input_name", "input_ids")
    if main == "pixel_values":
        size = getattr(config, "image_size", 224)
        size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        dims = tuple(shape) if shape else (batch, getattr(config, "num_channels", 3), *size)
        return (torch.empty(dims, device="meta"),), {}
    if main != "input_ids":
        raise ValueError(f"{type(model).__name__} takes {main!r}: pass example inputs yourself")
    dims = tuple(shape) if shape else (batch, seq)
    ids = torch.zeros(dims, dtype=torch.long, device="meta")
    kwargs = {"decoder_input_ids": ids} if getattr(config, "is_encoder_decoder", False) else {}
    return (ids,), kwargs


__all__ = ["TASKS", "load_config", "parse_overrides", "auto_class", "weightless_model", "example_inputs"]
