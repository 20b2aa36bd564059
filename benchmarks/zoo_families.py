"""The zoo's families: unmodified transformers models built from small configs (random init).

Each family is a task and a builder. Language models share one shape (`layers` blocks,
width `width`, `width // 32` heads, a 4·width MLP, 256 byte tokens, context `block`);
vision models read scikit-learn's 8×8 one-channel digits. Only the config is ours: every
module, initialisation and forward is the library's own, as a user gets it.

`split` is fixed here, before any training, so that the held-back quarter
(`HOLDOUT`) stays unseen while a default is chosen on the rest (`SELECT`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

#: Tasks: "causal" (next byte), "masked" (15% of bytes masked with byte 0, predict them),
#: "seq2seq" (the encoder reads the masked text, the decoder writes the original),
#: "vision" (digits classification).
TASKS = ("causal", "masked", "seq2seq", "vision")


@dataclass(frozen=True)
class Family:
    name: str
    task: str
    build: Callable[[int, int, int], torch.nn.Module]  # (layers, width, block) -> model
    patterns: str  # what it brings that the development families do not
    split: str = "select"  # "dev" (the five the old default was tuned on), "select" or "holdout"


def _t():
    import transformers as T
    T.logging.set_verbosity_error()
    return T


def _lm(width: int, layers: int) -> dict:
    return dict(hidden_size=width, num_hidden_layers=layers, num_attention_heads=max(1, width // 32),
                intermediate_size=4 * width, vocab_size=256)


# --- causal language models -------------------------------------------------------------

def gpt2(layers, width, block):
    T = _t()
    return T.GPT2LMHeadModel(T.GPT2Config(n_layer=layers, n_embd=width, n_head=max(1, width // 32),
                                          vocab_size=256, n_positions=block, bos_token_id=0, eos_token_id=0))


def llama(layers, width, block):
    T = _t()
    return T.LlamaForCausalLM(T.LlamaConfig(num_key_value_heads=max(1, width // 64),
                                            max_position_embeddings=block, **_lm(width, layers)))


def gpt_neox(layers, width, block):
    T = _t()
    return T.GPTNeoXForCausalLM(T.GPTNeoXConfig(max_position_embeddings=block, **_lm(width, layers)))


def phi(layers, width, block):
    T = _t()
    return T.PhiForCausalLM(T.PhiConfig(max_position_embeddings=block, **_lm(width, layers)))


def falcon(layers, width, block):
    T = _t()
    return T.FalconForCausalLM(T.FalconConfig(hidden_size=width, num_hidden_layers=layers,
                                              num_attention_heads=max(1, width // 32), vocab_size=256))


def bloom(layers, width, block):
    T = _t()
    return T.BloomForCausalLM(T.BloomConfig(hidden_size=width, n_layer=layers, n_head=max(1, width // 32),
                                            vocab_size=256))


def gemma(layers, width, block):
    T = _t()
    return T.GemmaForCausalLM(T.GemmaConfig(num_key_value_heads=1, head_dim=32, max_position_embeddings=block,
                                            **_lm(width, layers)))


def opt(layers, width, block):
    T = _t()
    return T.OPTForCausalLM(T.OPTConfig(hidden_size=width, ffn_dim=4 * width, num_hidden_layers=layers,
                                        num_attention_heads=max(1, width // 32), vocab_size=256,
                                        max_position_embeddings=block, word_embed_proj_dim=width,
                                        pad_token_id=1, bos_token_id=2, eos_token_id=2))


def qwen2(layers, width, block):
    T = _t()
    return T.Qwen2ForCausalLM(T.Qwen2Config(num_key_value_heads=max(1, width // 64),
                                            max_position_embeddings=block, **_lm(width, layers)))


def gptj(layers, width, block):
    T = _t()
    return T.GPTJForCausalLM(T.GPTJConfig(n_embd=width, n_layer=layers, n_head=max(1, width // 32),
                                          rotary_dim=16, n_positions=block, vocab_size=256,
                                          bos_token_id=0, eos_token_id=0))


def codegen(layers, width, block):
    T = _t()
    return T.CodeGenForCausalLM(T.CodeGenConfig(n_embd=width, n_layer=layers, n_head=max(1, width // 32),
                                                rotary_dim=16, n_positions=block, n_ctx=block, vocab_size=256,
                                                bos_token_id=0, eos_token_id=0))


def gpt_bigcode(layers, width, block):
    T = _t()
    return T.GPTBigCodeForCausalLM(T.GPTBigCodeConfig(n_embd=width, n_layer=layers, n_head=max(1, width // 32),
                                                      n_positions=block, vocab_size=256, multi_query=True,
                                                      bos_token_id=0, eos_token_id=0))


def stablelm(layers, width, block):
    T = _t()
    return T.StableLmForCausalLM(T.StableLmConfig(num_key_value_heads=max(1, width // 32),
                                                  max_position_embeddings=block, **_lm(width, layers)))


def olmo(layers, width, block):
    T = _t()
    return T.OlmoForCausalLM(T.OlmoConfig(max_position_embeddings=block, pad_token_id=1, bos_token_id=None,
                                          eos_token_id=2, **_lm(width, layers)))


def phi3(layers, width, block):
    T = _t()
    return T.Phi3ForCausalLM(T.Phi3Config(max_position_embeddings=block, original_max_position_embeddings=block,
                                          pad_token_id=0, bos_token_id=1, eos_token_id=2, **_lm(width, layers)))


def starcoder2(layers, width, block):
    T = _t()
    return T.Starcoder2ForCausalLM(T.Starcoder2Config(num_key_value_heads=max(1, width // 64),
                                                      max_position_embeddings=block, bos_token_id=0,
                                                      eos_token_id=0, **_lm(width, layers)))


def persimmon(layers, width, block):
    T = _t()
    return T.PersimmonForCausalLM(T.PersimmonConfig(max_position_embeddings=block, pad_token_id=None,
                                                    bos_token_id=1, eos_token_id=2, **_lm(width, layers)))


def biogpt(layers, width, block):
    T = _t()
    return T.BioGptForCausalLM(T.BioGptConfig(max_position_embeddings=block, pad_token_id=1, bos_token_id=0,
                                              eos_token_id=2, **_lm(width, layers)))


def mpt(layers, width, block):
    T = _t()
    return T.MptForCausalLM(T.MptConfig(d_model=width, n_heads=max(1, width // 32), n_layers=layers,
                                        expansion_ratio=4, max_seq_len=block, vocab_size=256))


def gemma2(layers, width, block):
    T = _t()
    return T.Gemma2ForCausalLM(T.Gemma2Config(num_key_value_heads=1, head_dim=32, max_position_embeddings=block,
                                              sliding_window=32, **_lm(width, layers)))


def cohere(layers, width, block):
    T = _t()
    return T.CohereForCausalLM(T.CohereConfig(num_key_value_heads=max(1, width // 32),
                                              max_position_embeddings=block, pad_token_id=0, bos_token_id=1,
                                              eos_token_id=2, **_lm(width, layers)))


def gpt_neo(layers, width, block):
    T = _t()
    return T.GPTNeoForCausalLM(T.GPTNeoConfig(hidden_size=width, num_layers=layers, num_heads=max(1, width // 32),
                                              attention_types=[[["global", "local"], max(1, layers // 2)]],
                                              window_size=32, intermediate_size=4 * width,
                                              max_position_embeddings=block, vocab_size=256,
                                              bos_token_id=0, eos_token_id=0))


# --- masked language models --------------------------------------------------------------

def bert(layers, width, block):
    T = _t()
    return T.BertForMaskedLM(T.BertConfig(max_position_embeddings=block, **_lm(width, layers)))


def roberta(layers, width, block):
    T = _t()
    return T.RobertaForMaskedLM(T.RobertaConfig(max_position_embeddings=block + 2, **_lm(width, layers)))


def deberta_v2(layers, width, block):
    T = _t()
    return T.DebertaV2ForMaskedLM(T.DebertaV2Config(max_position_embeddings=block, relative_attention=True,
                                                    pos_att_type=["p2c", "c2p"], position_buckets=32,
                                                    max_relative_positions=block, position_biased_input=False,
                                                    **_lm(width, layers)))


def albert(layers, width, block):
    T = _t()
    return T.AlbertForMaskedLM(T.AlbertConfig(embedding_size=width // 2, max_position_embeddings=block,
                                              **_lm(width, layers)))


def electra(layers, width, block):
    T = _t()
    return T.ElectraForMaskedLM(T.ElectraConfig(embedding_size=width // 2, max_position_embeddings=block,
                                                **_lm(width, layers)))


def distilbert(layers, width, block):
    T = _t()
    return T.DistilBertForMaskedLM(T.DistilBertConfig(dim=width, n_layers=layers, n_heads=max(1, width // 32),
                                                      hidden_dim=4 * width, vocab_size=256,
                                                      max_position_embeddings=block))


def roformer(layers, width, block):
    T = _t()
    return T.RoFormerForMaskedLM(T.RoFormerConfig(embedding_size=width, max_position_embeddings=block,
                                                  **_lm(width, layers)))


def mpnet(layers, width, block):
    T = _t()
    return T.MPNetForMaskedLM(T.MPNetConfig(max_position_embeddings=block + 2, **_lm(width, layers)))


def modernbert(layers, width, block):
    T = _t()
    return T.ModernBertForMaskedLM(T.ModernBertConfig(
        hidden_size=width, num_hidden_layers=layers, num_attention_heads=max(1, width // 32),
        intermediate_size=2 * width, vocab_size=256, max_position_embeddings=block, local_attention=32,
        pad_token_id=1, bos_token_id=2, eos_token_id=2, cls_token_id=2, sep_token_id=2))


# --- encoder-decoders ----------------------------------------------------------------------

def t5(layers, width, block):
    T = _t()
    return T.T5ForConditionalGeneration(T.T5Config(d_model=width, d_ff=4 * width, d_kv=32,
                                                   num_heads=max(1, width // 32), num_layers=layers // 2 or 1,
                                                   vocab_size=256, decoder_start_token_id=0, pad_token_id=0,
                                                   eos_token_id=1))


def bart(layers, width, block):
    T = _t()
    return T.BartForConditionalGeneration(T.BartConfig(
        d_model=width, encoder_layers=layers // 2 or 1, decoder_layers=layers // 2 or 1,
        encoder_attention_heads=max(1, width // 32), decoder_attention_heads=max(1, width // 32),
        encoder_ffn_dim=4 * width, decoder_ffn_dim=4 * width, vocab_size=256, max_position_embeddings=block,
        pad_token_id=1, bos_token_id=2, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None))


def pegasus(layers, width, block):
    T = _t()
    return T.PegasusForConditionalGeneration(T.PegasusConfig(
        d_model=width, encoder_layers=layers // 2 or 1, decoder_layers=layers // 2 or 1,
        encoder_attention_heads=max(1, width // 32), decoder_attention_heads=max(1, width // 32),
        encoder_ffn_dim=4 * width, decoder_ffn_dim=4 * width, vocab_size=256, max_position_embeddings=block,
        pad_token_id=1, eos_token_id=2, decoder_start_token_id=1, forced_eos_token_id=None))


# --- vision (8×8 one-channel digits, 10 classes) -------------------------------------------

def vit(layers, width, block):
    T = _t()
    return T.ViTForImageClassification(T.ViTConfig(
        image_size=8, patch_size=2, num_channels=1, hidden_size=width, num_hidden_layers=layers,
        num_attention_heads=max(1, width // 32), intermediate_size=4 * width, num_labels=10))


def resnet(layers, width, block):
    T = _t()
    return T.ResNetForImageClassification(T.ResNetConfig(
        num_channels=1, embedding_size=width // 2, hidden_sizes=[width // 2, width],
        depths=[layers // 2, layers - layers // 2], layer_type="basic", num_labels=10,
        downsample_in_first_stage=False))


def convnext(layers, width, block):
    T = _t()
    return T.ConvNextForImageClassification(T.ConvNextConfig(
        num_channels=1, patch_size=2, image_size=8, num_stages=2, hidden_sizes=[width // 2, width],
        depths=[layers // 2, layers - layers // 2], num_labels=10))


def swin(layers, width, block):
    T = _t()
    return T.SwinForImageClassification(T.SwinConfig(
        image_size=8, patch_size=2, num_channels=1, embed_dim=width // 2, depths=[layers // 2, layers - layers // 2],
        num_heads=[max(1, width // 64), max(1, width // 32)], window_size=2, num_labels=10))


def mobilenet_v2(layers, width, block):
    T = _t()
    return T.MobileNetV2ForImageClassification(T.MobileNetV2Config(
        num_channels=1, image_size=8, depth_multiplier=width / 128, num_labels=10))


def deit(layers, width, block):
    T = _t()
    return T.DeiTForImageClassification(T.DeiTConfig(
        image_size=8, patch_size=2, num_channels=1, hidden_size=width, num_hidden_layers=layers,
        num_attention_heads=max(1, width // 32), intermediate_size=4 * width, num_labels=10))


def beit(layers, width, block):
    T = _t()
    return T.BeitForImageClassification(T.BeitConfig(
        image_size=8, patch_size=2, num_channels=1, hidden_size=width, num_hidden_layers=layers,
        num_attention_heads=max(1, width // 32), intermediate_size=4 * width, num_labels=10,
        use_relative_position_bias=True, use_mean_pooling=True, layer_scale_init_value=0.1))


def regnet(layers, width, block):
    T = _t()
    return T.RegNetForImageClassification(T.RegNetConfig(
        num_channels=1, embedding_size=width // 4, hidden_sizes=[width // 2, width],
        depths=[layers // 2, layers - layers // 2], groups_width=16, layer_type="y", num_labels=10))


def efficientnet(layers, width, block):
    T = _t()
    return T.EfficientNetForImageClassification(T.EfficientNetConfig(
        num_channels=1, image_size=8, width_coefficient=0.25, depth_coefficient=0.5, hidden_dim=320,
        strides=[1, 1, 2, 1, 1, 2, 1], depthwise_padding=[],
        num_labels=10, dropout_rate=0.0, drop_connect_rate=0.0))


def dinov2(layers, width, block):
    T = _t()
    return T.Dinov2ForImageClassification(T.Dinov2Config(
        image_size=8, patch_size=2, num_channels=1, hidden_size=width, num_hidden_layers=layers,
        num_attention_heads=max(1, width // 32), mlp_ratio=4, num_labels=10, layerscale_value=1e-5))


def poolformer(layers, width, block):
    T = _t()
    return T.PoolFormerForImageClassification(T.PoolFormerConfig(
        num_channels=1, num_encoder_blocks=2,
        depths=[layers // 2, layers - layers // 2], hidden_sizes=[width // 2, width], patch_sizes=[3, 3],
        strides=[2, 2], padding=[1, 1], num_labels=10))


FAMILIES: dict[str, Family] = {f.name: f for f in [
    # the five the previous default was developed on
    Family("gpt2", "causal", gpt2, "tied head, learned positions, Conv1D, fused QKV", "dev"),
    Family("llama", "causal", llama, "RoPE, SwiGLU, GQA, RMSNorm, untied head", "dev"),
    Family("bert", "masked", bert, "post-norm, tied decoder, token types", "dev"),
    Family("vit", "vision", vit, "patch conv stem, CLS token", "dev"),
    Family("resnet", "vision", resnet, "BatchNorm convs, unnormalised stream", "dev"),
    # causal
    Family("gpt_neox", "causal", gpt_neox, "parallel residual, partial rotary, per-head interleaved fused QKV"),
    Family("phi", "causal", phi, "attention and MLP in parallel off one LayerNorm, partial rotary"),
    Family("falcon", "causal", falcon, "parallel attention, multi-query fused QKV, no biases"),
    Family("bloom", "causal", bloom, "ALiBi, LayerNorm on the embeddings, fused QKV"),
    Family("gemma", "causal", gemma, "1+w RMSNorm, scaled embedding, GeGLU, MQA"),
    Family("opt", "causal", opt, "learned positions with offset, ReLU MLP", "holdout"),
    Family("qwen2", "causal", qwen2, "biased QKV, SwiGLU, GQA"),
    Family("gptj", "causal", gptj, "parallel attention+MLP, rotary on 16 dims, untied biased head", "holdout"),
    Family("codegen", "causal", codegen, "GPT-J block with an mp-packed fused QKV"),
    Family("gpt_bigcode", "causal", gpt_bigcode, "multi-query fused c_attn, learned positions", "holdout"),
    Family("stablelm", "causal", stablelm, "partial rotary, LayerNorm with SwiGLU"),
    Family("olmo", "causal", olmo, "non-parametric LayerNorm (no gains at all)", "holdout"),
    Family("phi3", "causal", phi3, "fused qkv and fused gate_up projections"),
    Family("starcoder2", "causal", starcoder2, "rotary, biased GELU MLP, GQA"),
    Family("persimmon", "causal", persimmon, "QK LayerNorm, squared ReLU, partial rotary", "holdout"),
    Family("biogpt", "causal", biogpt, "scaled embedding, learned positions, post-attention LN"),
    Family("mpt", "causal", mpt, "ALiBi, no biases, tied head"),
    Family("gemma2", "causal", gemma2, "sandwich norms, logit soft-capping, sliding window"),
    Family("cohere", "causal", cohere, "parallel block, bias-free LayerNorm, logit scale", "holdout"),
    Family("gpt_neo", "causal", gpt_neo, "alternating local/global attention, unscaled scores"),
    # masked
    Family("roberta", "masked", roberta, "BERT with padding-offset positions"),
    Family("deberta_v2", "masked", deberta_v2, "disentangled relative attention, no absolute positions"),
    Family("albert", "masked", albert, "one layer's weights shared by every layer, factorised embedding"),
    Family("electra", "masked", electra, "factorised embedding projected up, generator head", "holdout"),
    Family("distilbert", "masked", distilbert, "BERT without token types or pooler"),
    Family("roformer", "masked", roformer, "rotary position in a post-norm encoder"),
    Family("mpnet", "masked", mpnet, "relative position bias with absolute positions", "holdout"),
    Family("modernbert", "masked", modernbert, "GeGLU, local/global attention, no biases"),
    # encoder-decoders
    Family("t5", "seq2seq", t5, "encoder-decoder, relative position bias, RMSNorm, scaled-free attention"),
    Family("bart", "seq2seq", bart, "encoder-decoder, post-norm, learned positions, tied 3-way embedding"),
    Family("pegasus", "seq2seq", pegasus, "encoder-decoder, pre-norm, sinusoidal positions", "holdout"),
    # vision
    Family("convnext", "vision", convnext, "depthwise 7×7, layer scale 1e-6, channels-last LayerNorm"),
    Family("swin", "vision", swin, "windowed attention, relative position table, patch merging"),
    Family("mobilenet_v2", "vision", mobilenet_v2, "inverted residuals, depthwise convs, BatchNorm, ReLU6"),
    Family("deit", "vision", deit, "ViT with a distillation token", "holdout"),
    Family("beit", "vision", beit, "relative position bias, layer scale 0.1, mean pooling"),
    Family("regnet", "vision", regnet, "grouped convs, squeeze-excitation, BatchNorm"),
    Family("efficientnet", "vision", efficientnet, "depthwise convs, squeeze-excitation, swish", "holdout"),
    Family("dinov2", "vision", dinov2, "layer scale 1e-5, CLS + mean pooled head"),
    Family("poolformer", "vision", poolformer, "pooling token mixer, GroupNorm, layer scale", "holdout"),
]}

SPLITS = ("dev", "select", "holdout")
