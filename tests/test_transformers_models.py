"""Every trainable parameter of real transformers models gets an atom of the right kind.

Models are built from small configs with random weights (no downloads); the file is skipped
when transformers is not installed.
"""
from __future__ import annotations

import re

import pytest
import torch

import normgraph

T = pytest.importorskip("transformers")
V = 97
IDS = torch.randint(0, V, (2, 8))


def gpt2():
    return T.GPT2LMHeadModel(T.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=V, n_positions=16)), (IDS,), {}


def llama():
    cfg = T.LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=V)
    return T.LlamaForCausalLM(cfg), (IDS,), {}


def bert():
    cfg = T.BertConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4, vocab_size=V)
    return T.BertModel(cfg), (IDS,), {}


def vit():
    cfg = T.ViTConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                      image_size=16, patch_size=8, num_labels=3)
    return T.ViTForImageClassification(cfg), (torch.randn(2, 3, 16, 16),), {}


def resnet():
    cfg = T.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)
    return T.ResNetForImageClassification(cfg), (torch.randn(2, 3, 32, 32),), {}


def mixtral():
    cfg = T.MixtralConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=V, num_local_experts=4)
    return T.MixtralForCausalLM(cfg), (IDS,), {}


def t5():
    cfg = T.T5Config(num_layers=1, d_model=32, d_ff=64, num_heads=4, d_kv=8, vocab_size=V)
    return T.T5ForConditionalGeneration(cfg), (IDS,), {"decoder_input_ids": IDS}


# (pattern, kind, (fan_in, fan_out) or None); the first matching pattern applies.
EXPECTED = {
    gpt2: [(r"wte|wpe", "embedding", None), (r"c_attn\.weight", "linear", (32, 32)),  # packed QKV ×3
           (r"attn\.c_proj\.weight", "linear", (32, 32)), (r"c_fc\.weight", "linear", (32, 128)),
           (r"mlp\.c_proj\.weight", "linear", (128, 32)), (r"ln_.*\.weight", "gain", None), (r"bias$", "bias", None)],
    llama: [(r"embed_tokens", "embedding", None), (r"q_proj|o_proj", "linear", (32, 32)),
            (r"k_proj|v_proj", "linear", (32, 16)), (r"gate_proj|up_proj", "linear", (32, 64)),
            (r"down_proj", "linear", (64, 32)), (r"lm_head", "linear", (32, V)), (r"norm", "gain", None)],
    bert: [(r"embeddings\.\w+_embeddings", "embedding", None), (r"LayerNorm\.weight", "gain", None),
           (r"bias$", "bias", None), (r"query|key|value|attention\.output\.dense|pooler", "linear", (32, 32)),
           (r"intermediate\.dense", "linear", (32, 64)), (r"output\.dense", "linear", (64, 32))],
    vit: [(r"cls_token|position_embeddings", "bias", None), (r"projection\.weight", "stem", None),
          (r"layernorm.*weight", "gain", None), (r"bias$", "bias", None),
          (r"[qkvo]_proj\.weight", "linear", (32, 32)), (r"fc1", "linear", (32, 64)), (r"fc2", "linear", (64, 32)),
          (r"classifier\.weight", "linear", (32, 3))],
    resnet: [(r"embedder\.convolution\.weight", "stem", None), (r"shortcut\.convolution|layer\.[02]\.convolution", "conv", None),  # 1×1: one matrix
             (r"convolution\.weight", "channel_conv", None),  # rule 10
             (r"normalization\.weight", "gain", None),
             (r"bias$", "bias", None), (r"classifier\.1\.weight", "linear", (16, 3))],
    mixtral: [(r"embed_tokens", "embedding", None), (r"gate_up_proj", "expert", (32, 64)),  # gate, up ×2
              (r"experts\.down_proj", "expert", (64, 32)), (r"mlp\.gate\.weight", "linear", (32, 4)),
              (r"q_proj|o_proj", "linear", (32, 32)), (r"k_proj|v_proj", "linear", (32, 16)),
              (r"lm_head", "linear", (32, V)), (r"norm", "gain", None)],
    t5: [(r"shared|relative_attention_bias", "embedding", None), (r"\.[qkvo]\.weight", "linear", (32, 32)),
         (r"wi\.weight", "linear", (32, 64)), (r"wo\.weight", "linear", (64, 32)), (r"layer_norm", "gain", None)],
}


@pytest.mark.parametrize("build", list(EXPECTED), ids=lambda f: f.__name__)
def test_every_parameter_gets_the_right_atom(build):
    torch.manual_seed(0)
    model, args, kwargs = build()
    ng = normgraph.analyze(model, args, kwargs)
    assert ng.diagnostics.frontend == "torch.export"
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert list(ng.atoms) == trainable
    for name, atom in ng.atoms.items():
        rule = next(((k, f) for pat, k, f in EXPECTED[build] if re.search(pat, name)), None)
        assert rule is not None, f"no expectation for {name}"
        kind, fans = rule
        assert atom.kind == kind, f"{name}: {atom.kind} != {kind} ({atom.note})"
        if fans is not None:
            assert (atom.fan_in, atom.fan_out) == fans, f"{name}: {atom.note}"
        assert atom.budget > 0 and atom.downstream > 0
    assert not ng.diagnostics.fallbacks, ng.diagnostics.fallbacks


def test_gpt2_tied_embedding_and_packed_qkv():
    model, args, _ = gpt2()
    ng = normgraph.analyze(model, args)
    assert "transformer.wte.weight" in ng.diagnostics.tied
    assert ng.atoms["transformer.h.0.attn.c_attn.weight"].options["matrix"] == [3, 32, 32]
    assert "use_cache=False" in str(ng)


def test_symbolic_trace_fails_on_gpt2_and_says_how_to_fix():
    model, _, _ = gpt2()
    with pytest.warns(UserWarning, match="pass example_inputs"):
        ng = normgraph.analyze(model)
    assert ng.diagnostics.frontend.startswith("modules")
    assert ng.atoms["transformer.h.0.attn.c_attn.weight"].kind == "linear"  # module rule for Conv1D
    assert ng.atoms["transformer.wte.weight"].kind == "embedding"


@pytest.mark.parametrize("build", [gpt2, mixtral, resnet], ids=lambda f: f.__name__)
def test_compiled_optimizer_trains_real_models(build):
    """End to end on packed QKV + tied embeddings, experts, and convs: every parameter moves,
    nothing is skipped, and a few steps on one batch lower its loss."""
    torch.manual_seed(0)
    model, args, kwargs = build()
    opt = normgraph.compile(model, args, kwargs, lr=0.1, compile_mode="eager")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def loss_fn():
        out = model(*args, **kwargs)
        logits = out.logits.reshape(-1, out.logits.shape[-1])
        target = args[0].reshape(-1) if args[0].dtype == torch.long else torch.zeros(len(logits), dtype=torch.long)
        return torch.nn.functional.cross_entropy(logits, target)

    losses = []
    for _ in range(4):
        loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert opt.skipped_steps == 0 and losses[-1] < losses[0]
    moved = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert set(moved) == {n for n, p in model.named_parameters() if p.requires_grad}
