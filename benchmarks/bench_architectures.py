"""Hugging Face architectures nobody shipped to us: the whole pipeline on each, from configs.

Each architecture is built from a small config (random weights, no download) and taken
through profile -> measure_cost (cpu) -> search -> quantize (cpu) -> export (plan, state dict,
``torch.export`` program, ONNX), each in its own process, as a user bringing that model would.
The table says which profiler runner took it, how much of it is quantizable, the profile's
cost in fp32 passes, whether the cost model's bytes equal what the quantized model holds,
which export formats were written and checked, and where a step failed (with the error).

Run: ``python benchmarks/bench_architectures.py`` (``--models mistral,t5`` for a subset);
writes ``benchmarks/results/architectures.md``. Needs ``transformers`` (``.[dev]``). timm
models (:data:`TIMM`): ``.venv-vision/bin/python benchmarks/bench_architectures.py --family
timm`` (``scripts/models_venv.sh`` makes that venv), written to ``architectures_timm.md``;
torchvision models (:data:`TORCHVISION`) the same way with ``--family torchvision``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))  # benchmarks/: the script's folder
from _tables import md_table, model_names, write_result
from bench_profile import forward_time

RESULTS = Path(__file__).parent / "results" / "architectures.md"
SCHEMES = ["bf16", "w8a8", "w4a16"]
FORMATS = ("plan", "state_dict", "program", "onnx")
ONNX_INSTALLED = all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript", "onnxruntime"))
"""Whether this environment can write ONNX (the torchvision/timm venv cannot)."""
VOCAB, SEQ = 256, 16
CALIB_BATCHES = 16  # of 16 samples: 256, as benchmarks/bench_models.py profiles

Inputs = Callable[[int, torch.Generator], dict[str, torch.Tensor]]


def _tokens(n: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones(n, SEQ, dtype=torch.long)}


def _ids(n: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(0, VOCAB, (n, SEQ), generator=g)}


_ENCODER_DECODER = {
    "vocab_size": VOCAB,
    "d_model": 64,
    "encoder_layers": 1,
    "decoder_layers": 1,
    "encoder_attention_heads": 4,
    "decoder_attention_heads": 4,
    "encoder_ffn_dim": 128,
    "decoder_ffn_dim": 128,
}
"""Sizes of the BART-style encoder-decoders (BART, Marian, Whisper). BART and Marian have a
shared embedding the model never calls, its encoder's and decoder's copies and the output
layer tied to it."""


_ENCODER_DECODER_SMALL = {
    "d_model": 32,
    "encoder_layers": 1,
    "decoder_layers": 1,
    "encoder_attention_heads": 2,
    "decoder_attention_heads": 2,
    "encoder_ffn_dim": 64,
    "decoder_ffn_dim": 64,
}
"""The same, half as wide, for the forecasting and detection transformers."""


def _seq2seq(n: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    return {**_tokens(n, g), "decoder_input_ids": torch.randint(0, VOCAB, (n, 8), generator=g)}


def _images(n: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(n, 3, 32, 32, generator=g)}


def _wave(n: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    return {"input_values": torch.randn(n, 4000, generator=g)}


def _mono(n: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    return {"input_values": torch.randn(n, 1, 640, generator=g)}


def _spectrogram(n: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    return {"spectrogram": torch.randn(n, 12, 16, generator=g)}


def _filterbanks(n: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        "input_features": torch.randn(n, 60, 40, generator=g),
        "attention_mask": torch.ones(n, 60, dtype=torch.long),
        "decoder_input_ids": torch.randint(0, VOCAB, (n, 4), generator=g),
    }


def _mels(n: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        "input_features": torch.randn(n, 40, 200, generator=g),
        "decoder_input_ids": torch.randint(0, VOCAB, (n, 4), generator=g),
    }


def _series(n: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    return {"past_values": torch.randn(n, 32, 3, generator=g)}  # [batch, context, channels]


def _forecast(n: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """A forecasting transformer's teacher-forced inputs: its output holds the loss (a scalar)
    before the predicted distribution's parameters, the output profiled."""
    past, future = 16 + 4, 4  # context + the largest lag; prediction length
    return {
        "past_values": torch.randn(n, past, generator=g),
        "past_time_features": torch.randn(n, past, 1, generator=g),
        "past_observed_mask": torch.ones(n, past),
        "future_values": torch.randn(n, future, generator=g),
        "future_time_features": torch.randn(n, future, 1, generator=g),
    }


def _image_text(n: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    return {**_ids(n, g), **_images(n, g)}


def _images64(n: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(n, 3, 64, 64, generator=g)}


IMAGE_TOKEN = VOCAB - 1
"""The vision-language models' image placeholder token (16 per prompt: one per patch)."""


def _image_prompt(n: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """A 32 x 32 image and a 24-token prompt whose tokens 2 to 17 are its 16 patches."""
    ids = torch.randint(1, VOCAB - 2, (n, 24), generator=g)
    ids[:, 2:18] = IMAGE_TOKEN
    return {
        "input_ids": ids,
        "attention_mask": torch.ones(n, 24, dtype=torch.long),
        "pixel_values": torch.randn(n, 3, 32, 32, generator=g),
    }


def _phonemes(n: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(0, 38, (n, 12), generator=g)}


_SMALL = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 64,
}
_DECODER = {
    **_SMALL,
    "num_key_value_heads": 2,
    "use_cache": False,
    "pad_token_id": 0,
    "bos_token_id": 0,
    "eos_token_id": 0,
}
_SSM_HEADS = {  # Mamba-2 mixers of the hybrid decoders: 8 heads of 16 (2 x hidden_size)
    "mamba_n_heads": 8,
    "mamba_d_head": 16,
    "mamba_d_state": 8,
    "mamba_n_groups": 1,
    "mamba_chunk_size": 16,
}
_VISION = {"image_size": 32, "num_labels": 5}
_VISION_TOWER = {  # a ViT on 32 x 32 images in 8 x 8 patches
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": 32,
    "patch_size": 8,
}
_WAV2VEC2 = {  # a two-convolution feature encoder on raw audio, a 3-way classifier head
    **_SMALL,
    "conv_dim": (32, 32),
    "conv_stride": (5, 2),
    "conv_kernel": (10, 3),
    "num_conv_pos_embeddings": 16,
    "num_conv_pos_embedding_groups": 4,
    "num_labels": 3,
}

ARCHITECTURES: dict[str, tuple[str, str, dict[str, Any], Inputs]] = {
    "mistral": ("MistralConfig", "MistralForCausalLM", _DECODER, _tokens),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", _DECODER, _tokens),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {**_DECODER, "head_dim": 16}, _tokens),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {**_DECODER, "head_dim": 16}, _tokens),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {**_SMALL, "use_cache": False}, _tokens),
    "opt": (
        "OPTConfig",
        "OPTForCausalLM",
        {
            "vocab_size": VOCAB,
            "hidden_size": 64,
            "ffn_dim": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 64,
            "word_embed_proj_dim": 64,
            "use_cache": False,
            "pad_token_id": 0,
        },
        _tokens,
    ),
    "falcon": (
        "FalconConfig",
        "FalconForCausalLM",
        {
            "vocab_size": VOCAB,
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "use_cache": False,
        },
        _tokens,
    ),
    "bloom": (
        "BloomConfig",
        "BloomForCausalLM",
        {"vocab_size": VOCAB, "hidden_size": 64, "n_layer": 2, "n_head": 4, "use_cache": False},
        _tokens,
    ),
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        {**_DECODER, "num_local_experts": 4, "num_experts_per_tok": 2},
        _tokens,
    ),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        {
            **_DECODER,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 64,
            "shared_expert_intermediate_size": 64,
        },
        _tokens,
    ),
    "olmoe": (
        "OlmoeConfig",
        "OlmoeForCausalLM",
        {**_DECODER, "num_experts": 4, "num_experts_per_tok": 2},
        _tokens,
    ),
    "gpt_oss": (
        "GptOssConfig",
        "GptOssForCausalLM",
        {
            **_DECODER,
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
            "head_dim": 16,
            "layer_types": ["sliding_attention", "full_attention"],
        },
        _tokens,
    ),
    "mamba": (
        "MambaConfig",
        "MambaForCausalLM",
        {
            "vocab_size": VOCAB,
            "hidden_size": 64,
            "state_size": 8,
            "num_hidden_layers": 2,
            "use_cache": False,
        },
        _ids,
    ),
    # state-space and hybrid decoders: recurrent cache layers, some beside attention
    "mamba2": (
        "Mamba2Config",
        "Mamba2ForCausalLM",
        {
            "vocab_size": VOCAB,
            "hidden_size": 64,
            "num_heads": 8,
            "head_dim": 16,
            "state_size": 8,
            "n_groups": 1,
            "num_hidden_layers": 2,
            "chunk_size": 16,
            "use_cache": False,
        },
        _ids,
    ),
    "jamba": (
        "JambaConfig",
        "JambaForCausalLM",
        {
            **_DECODER,
            "num_experts": 2,
            "num_experts_per_tok": 1,
            "attn_layer_period": 2,
            "attn_layer_offset": 1,
            "expert_layer_period": 2,
            "expert_layer_offset": 1,
            "mamba_d_state": 8,
            "mamba_dt_rank": 8,
            "use_mamba_kernels": False,
        },
        _tokens,
    ),
    "bamba": (
        "BambaConfig",
        "BambaForCausalLM",
        {**_DECODER, "attn_layer_indices": [1], **_SSM_HEADS},
        _tokens,
    ),
    "granite_hybrid": (
        "GraniteMoeHybridConfig",
        "GraniteMoeHybridForCausalLM",
        {
            **_DECODER,
            "layer_types": ["mamba", "attention"],
            "num_local_experts": 2,
            "num_experts_per_tok": 1,
            **_SSM_HEADS,
        },
        _tokens,
    ),
    "lfm2": (
        "Lfm2Config",
        "Lfm2ForCausalLM",
        {**_DECODER, "layer_types": ["conv", "full_attention"]},
        _tokens,
    ),
    "qwen3_next": (
        "Qwen3NextConfig",
        "Qwen3NextForCausalLM",
        {
            **_DECODER,
            "head_dim": 16,
            "layer_types": ["linear_attention", "full_attention"],
            "linear_num_value_heads": 4,
            "linear_num_key_heads": 2,
            "linear_key_head_dim": 16,
            "linear_value_head_dim": 16,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 64,
            "shared_expert_intermediate_size": 64,
        },
        _tokens,
    ),
    "deepseek_v3": (  # multi-head latent attention (low-rank q and kv), shared + routed experts
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        {
            **_DECODER,
            "num_key_value_heads": 4,
            "n_routed_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "n_shared_experts": 1,
            "first_k_dense_replace": 1,
            "kv_lora_rank": 16,
            "q_lora_rank": 24,
            "qk_rope_head_dim": 8,
            "qk_nope_head_dim": 8,
            "v_head_dim": 16,
            "n_group": 2,
            "topk_group": 1,
        },
        _tokens,
    ),
    "t5": (
        "T5Config",
        "T5ForConditionalGeneration",
        {
            "vocab_size": VOCAB,
            "d_model": 64,
            "d_kv": 16,
            "d_ff": 128,
            "num_layers": 2,
            "num_heads": 4,
            "use_cache": False,
            "decoder_start_token_id": 0,
        },
        _seq2seq,
    ),
    "bart": (
        "BartConfig",
        "BartForConditionalGeneration",
        {**_ENCODER_DECODER, "max_position_embeddings": 64, "use_cache": False},
        _seq2seq,
    ),
    "marian": (
        "MarianConfig",
        "MarianMTModel",
        {
            **_ENCODER_DECODER,
            "max_position_embeddings": 64,
            "pad_token_id": 0,
            "decoder_start_token_id": 0,
            "use_cache": False,
        },
        _seq2seq,
    ),
    "distilbert": (
        "DistilBertConfig",
        "DistilBertForSequenceClassification",
        {
            "vocab_size": VOCAB,
            "dim": 64,
            "hidden_dim": 128,
            "n_layers": 2,
            "n_heads": 4,
            "max_position_embeddings": 64,
            "num_labels": 3,
        },
        _tokens,
    ),
    "albert": (  # one layer's weights shared by every depth: each Linear called twice
        "AlbertConfig",
        "AlbertForSequenceClassification",
        {**_SMALL, "embedding_size": 32, "num_labels": 3},
        _tokens,
    ),
    "deberta_v2": (
        "DebertaV2Config",
        "DebertaV2ForSequenceClassification",
        {
            **_SMALL,
            "num_labels": 3,
            "relative_attention": True,
            "position_buckets": 8,
            "pos_att_type": ["p2c", "c2p"],
        },
        _tokens,
    ),
    "roberta": (
        "RobertaConfig",
        "RobertaForSequenceClassification",
        {**_SMALL, "num_labels": 3, "pad_token_id": 1, "max_position_embeddings": 80},
        _tokens,
    ),
    "clip_text": ("CLIPTextConfig", "CLIPTextModel", _SMALL, _tokens),
    "vit": (
        "ViTConfig",
        "ViTForImageClassification",
        {
            **_VISION,
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 128,
            "patch_size": 8,
        },
        _images,
    ),
    "beit": (
        "BeitConfig",
        "BeitForImageClassification",
        {
            **_VISION,
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 128,
            "patch_size": 8,
            "use_relative_position_bias": True,
        },
        _images,
    ),
    "convnext": (
        "ConvNextConfig",
        "ConvNextForImageClassification",
        {"hidden_sizes": [16, 32], "depths": [1, 1], "num_stages": 2, "num_labels": 5},
        _images,
    ),
    "swin": (
        "SwinConfig",
        "SwinForImageClassification",
        {
            **_VISION,
            "patch_size": 4,
            "embed_dim": 16,
            "depths": [1, 1],
            "num_heads": [2, 2],
            "window_size": 4,
        },
        _images,
    ),
    "mobilevit": (
        "MobileViTConfig",
        "MobileViTForImageClassification",
        {**_VISION, "hidden_sizes": [32, 32, 32], "neck_hidden_sizes": [8, 8, 16, 16, 24, 32, 64]},
        _images,
    ),
    "wav2vec2": (
        "Wav2Vec2Config",
        "Wav2Vec2ForSequenceClassification",
        _WAV2VEC2,
        _wave,
    ),
    "speech2text": (  # strided Conv1d subsampler on filterbank frames
        "Speech2TextConfig",
        "Speech2TextForConditionalGeneration",
        {
            **_ENCODER_DECODER,
            "input_feat_per_channel": 40,
            "input_channels": 1,
            "conv_channels": 32,
            "max_source_positions": 64,
            "max_target_positions": 32,
            "use_cache": False,
            "decoder_start_token_id": 0,
        },
        _filterbanks,
    ),
    "whisper": (
        "WhisperConfig",
        "WhisperForConditionalGeneration",
        {
            **_ENCODER_DECODER,
            "num_mel_bins": 40,
            "max_source_positions": 100,
            "max_target_positions": 32,
            "use_cache": False,
            "pad_token_id": 0,
            "decoder_start_token_id": 0,
        },
        _mels,
    ),
    # audio codecs and a vocoder: weight-normed convolutions, transposed-convolution
    # upsamplers, an LSTM (EnCodec), residual vector quantizers, Snake activations (DAC)
    "encodec": (
        "EncodecConfig",
        "EncodecModel",
        {
            "num_filters": 8,
            "hidden_size": 32,
            "upsampling_ratios": [4, 4],
            "codebook_size": 64,
            "codebook_dim": 32,
            "num_lstm_layers": 1,
            "target_bandwidths": [1.5],
            "sampling_rate": 2000,
        },
        _mono,
    ),
    "dac": (
        "DacConfig",
        "DacModel",
        {
            "encoder_hidden_size": 8,
            "downsampling_ratios": [2, 4],
            "decoder_hidden_size": 32,
            "n_codebooks": 2,
            "codebook_size": 64,
            "codebook_dim": 4,
            "hidden_size": 32,
            "upsampling_ratios": [4, 2],
        },
        _mono,
    ),
    "speecht5_hifigan": (
        "SpeechT5HifiGanConfig",
        "SpeechT5HifiGan",
        {
            "model_in_dim": 16,
            "upsample_initial_channel": 32,
            "upsample_rates": [4, 4],
            "upsample_kernel_sizes": [8, 8],
            "resblock_kernel_sizes": [3, 5],
            "resblock_dilation_sizes": [[1, 3], [1, 3]],
            "normalize_before": False,
        },
        _spectrogram,
    ),
    # more architectures: a relative-position table cached on its module by forward
    # (Wav2Vec2-Conformer), segmentation and depth heads, TF-style "same" padding, a
    # multi-query decoder, an RNN-style LM, a recurrent/attention hybrid, two-stream
    # relative attention on bare parameters (XLNet), Fourier token mixing (FNet)
    "wav2vec2_conformer": (
        "Wav2Vec2ConformerConfig",
        "Wav2Vec2ConformerForSequenceClassification",
        {**_WAV2VEC2, "conv_depthwise_kernel_size": 7, "position_embeddings_type": "relative"},
        _wave,
    ),
    "segformer": (
        "SegformerConfig",
        "SegformerForSemanticSegmentation",
        {
            "num_encoder_blocks": 2,
            "depths": [1, 1],
            "sr_ratios": [2, 1],
            "hidden_sizes": [16, 32],
            "patch_sizes": [7, 3],
            "strides": [4, 2],
            "num_attention_heads": [1, 2],
            "decoder_hidden_size": 32,
            "num_labels": 4,
        },
        _images,
    ),
    "dpt": (
        "DPTConfig",
        "DPTForDepthEstimation",
        {
            "hidden_size": 32,
            "num_hidden_layers": 4,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "image_size": 32,
            "patch_size": 8,
            "backbone_out_indices": [0, 1, 2, 3],
            "neck_hidden_sizes": [8, 16, 32, 32],
            "fusion_hidden_size": 16,
        },
        _images,
    ),
    "mobilenet_v2": (
        "MobileNetV2Config",
        "MobileNetV2ForImageClassification",
        {**_VISION, "depth_multiplier": 0.35},
        _images,
    ),
    "gpt_bigcode": (
        "GPTBigCodeConfig",
        "GPTBigCodeForCausalLM",
        {
            "vocab_size": VOCAB,
            "n_embd": 64,
            "n_layer": 2,
            "n_head": 4,
            "n_positions": 64,
            "multi_query": True,
            "use_cache": False,
        },
        _tokens,
    ),
    "rwkv": (
        "RwkvConfig",
        "RwkvForCausalLM",
        {
            "vocab_size": VOCAB,
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "attention_hidden_size": 64,
            "intermediate_size": 128,
            "context_length": 64,
            "use_cache": False,
        },
        _ids,
    ),
    "recurrent_gemma": (
        "RecurrentGemmaConfig",
        "RecurrentGemmaForCausalLM",
        {
            **_DECODER,
            "num_hidden_layers": 3,
            "num_key_value_heads": 1,
            "head_dim": 16,
            "lru_width": 64,
            "attention_window_size": 16,
            "conv1d_width": 4,
            "block_types": ["recurrent", "recurrent", "attention"],
        },
        _tokens,
    ),
    "xlnet": (
        "XLNetConfig",
        "XLNetForSequenceClassification",
        {
            "vocab_size": VOCAB,
            "d_model": 64,
            "n_layer": 2,
            "n_head": 4,
            "d_inner": 128,
            "num_labels": 3,
        },
        _tokens,
    ),
    "fnet": ("FNetConfig", "FNetForSequenceClassification", {**_SMALL, "num_labels": 3}, _ids),
    "patchtst": (
        "PatchTSTConfig",
        "PatchTSTForPrediction",
        {
            "num_input_channels": 3,
            "context_length": 32,
            "patch_length": 8,
            "patch_stride": 8,
            "prediction_length": 8,
            "d_model": 32,
            "num_attention_heads": 4,
            "num_hidden_layers": 2,
            "ffn_dim": 64,
        },
        _series,
    ),
    "time_series_transformer": (
        "TimeSeriesTransformerConfig",
        "TimeSeriesTransformerForPrediction",
        {
            "prediction_length": 4,
            "context_length": 16,
            "lags_sequence": [1, 2, 3, 4],
            "num_time_features": 1,
            **_ENCODER_DECODER_SMALL,
        },
        _forecast,
    ),
    "longformer": (
        "LongformerConfig",
        "LongformerForSequenceClassification",
        {**_SMALL, "attention_window": 8, "num_labels": 3, "pad_token_id": 1},
        _tokens,
    ),
    "perceiver": (
        "PerceiverConfig",
        "PerceiverForSequenceClassification",
        {
            "vocab_size": VOCAB,
            "d_model": 64,
            "num_latents": 16,
            "d_latents": 64,
            "num_blocks": 1,
            "num_self_attends_per_block": 2,
            "num_self_attention_heads": 4,
            "num_cross_attention_heads": 4,
            "max_position_embeddings": SEQ,
            "num_labels": 3,
        },
        _ids,
    ),
    "clip": (  # the two towers: image-text similarity logits
        "CLIPConfig",
        "CLIPModel",
        {
            "text_config": {**_SMALL, "max_position_embeddings": SEQ},
            "vision_config": _VISION_TOWER,
            "projection_dim": 32,
        },
        _image_text,
    ),
    "swin2sr": (  # image to image (x2 super-resolution)
        "Swin2SRConfig",
        "Swin2SRForImageSuperResolution",
        {
            "image_size": 32,
            "patch_size": 1,
            "embed_dim": 16,
            "depths": [1, 1],
            "num_heads": [2, 2],
            "window_size": 4,
            "upscale": 2,
            "upsampler": "pixelshuffle",
        },
        _images,
    ),
    "upernet": (  # semantic segmentation on a ConvNeXt backbone
        "UperNetConfig",
        "UperNetForSemanticSegmentation",
        {
            "backbone_config": {
                "model_type": "convnext",
                "hidden_sizes": [8, 16, 32, 64],
                "depths": [1, 1, 1, 1],
                "out_features": ["stage1", "stage2", "stage3", "stage4"],
            },
            "hidden_size": 16,
            "auxiliary_in_channels": 32,
            "auxiliary_channels": 16,
            "num_labels": 4,
        },
        _images64,
    ),
    "rt_detr": (  # a detector whose decoder queries are the encoder's top-scoring anchors
        "RTDetrConfig",
        "RTDetrForObjectDetection",
        {
            "backbone_config": {
                "model_type": "rt_detr_resnet",
                "embedding_size": 16,
                "hidden_sizes": [16, 32, 64, 128],
                "depths": [1, 1, 1, 1],
                "out_features": ["stage2", "stage3", "stage4"],
            },
            "encoder_in_channels": [32, 64, 128],
            "decoder_in_channels": [32, 32, 32],
            "d_model": 32,
            "encoder_hidden_dim": 32,
            "encoder_ffn_dim": 64,
            "decoder_ffn_dim": 64,
            "num_queries": 20,
            "decoder_layers": 1,
            "num_labels": 4,
            "encoder_attention_heads": 2,
            "decoder_attention_heads": 2,
            "num_denoising": 0,
        },
        _images64,
    ),
    "vits": (  # text to speech: predicted durations set the waveform's length
        "VitsConfig",
        "VitsModel",
        {
            "vocab_size": 38,
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "ffn_dim": 64,
            "flow_size": 16,
            "spectrogram_bins": 33,
            "upsample_initial_channel": 32,
            "upsample_rates": [4, 4],
            "upsample_kernel_sizes": [8, 8],
            "resblock_kernel_sizes": [3],
            "resblock_dilation_sizes": [[1, 3]],
            "prior_encoder_num_flows": 2,
            "prior_encoder_num_wavenet_layers": 1,
            "duration_predictor_num_flows": 2,
            "duration_predictor_filter_channels": 32,
            "depth_separable_num_layers": 2,
            "noise_scale": 0.0,  # no sampling: a deterministic forward (the profile refuses
            "noise_scale_duration": 0.0,  # one whose fp32 output changes from run to run)
        },
        _phonemes,
    ),
    "llava": (  # a vision-language model: CLIP vision tower, projector, Llama decoder
        "LlavaConfig",
        "LlavaForConditionalGeneration",
        {
            "vision_config": {"model_type": "clip_vision_model", **_VISION_TOWER},
            "text_config": {"model_type": "llama", **_DECODER},
            "image_token_index": IMAGE_TOKEN,
            "vision_feature_layer": -1,
            "vision_feature_select_strategy": "default",
            "image_seq_length": 16,
        },
        _image_prompt,
    ),
    "paligemma": (  # SigLIP vision tower, Gemma decoder
        "PaliGemmaConfig",
        "PaliGemmaForConditionalGeneration",
        {
            "vision_config": {
                "model_type": "siglip_vision_model",
                **_VISION_TOWER,
                "projection_dim": 64,
            },
            "text_config": {"model_type": "gemma", **_DECODER, "head_dim": 16},
            "image_token_index": IMAGE_TOKEN,
            "projection_dim": 64,
            "hidden_size": 64,
        },
        _image_prompt,
    ),
    "zamba2": (
        "Zamba2Config",
        "Zamba2ForCausalLM",
        {
            **_DECODER,
            "num_hidden_layers": 3,
            "layers_block_type": ["mamba", "hybrid", "mamba"],
            "mamba_d_state": 8,
            "mamba_headdim": 16,
            "n_mamba_heads": 8,
            "mamba_ngroups": 1,
            "chunk_size": 16,
            "use_mem_rope": False,
        },
        _tokens,
    ),
    # a later round: more recent decoders and encoders, base models (no head: their
    # last_hidden_state, compared by MSE), a detector and a depth estimator
    "modernbert": (
        "ModernBertConfig",
        "ModernBertForSequenceClassification",
        {
            **_SMALL,
            "num_labels": 3,
            "pad_token_id": 0,
            "global_attn_every_n_layers": 2,
            "local_attention": 8,
        },
        _tokens,
    ),
    "gemma3_text": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        {**_DECODER, "head_dim": 16, "sliding_window": 8},
        _tokens,
    ),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {**_DECODER, "head_dim": 16}, _tokens),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", _DECODER, _tokens),
    "cohere2": ("Cohere2Config", "Cohere2ForCausalLM", {**_DECODER, "sliding_window": 8}, _tokens),
    "gptj": (
        "GPTJConfig",
        "GPTJForCausalLM",
        {
            "vocab_size": VOCAB,
            "n_embd": 64,
            "n_layer": 2,
            "n_head": 4,
            "rotary_dim": 8,
            "n_positions": 64,
            "use_cache": False,
        },
        _tokens,
    ),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", _DECODER, _tokens),
    "dinov2": ("Dinov2Config", "Dinov2Model", _VISION_TOWER, _images),
    "dinov2_cls": (
        "Dinov2Config",
        "Dinov2ForImageClassification",
        {**_VISION_TOWER, "num_labels": 5},
        _images,
    ),
    "siglip_vision": ("SiglipVisionConfig", "SiglipVisionModel", _VISION_TOWER, _images),
    "detr": (
        "DetrConfig",
        "DetrForObjectDetection",
        {
            "use_timm_backbone": False,
            "backbone_config": {
                "model_type": "resnet",
                "embedding_size": 16,
                "hidden_sizes": [16, 32, 64, 128],
                "depths": [1, 1, 1, 1],
                "out_features": ["stage4"],
            },
            **_ENCODER_DECODER_SMALL,
            "num_queries": 10,
            "num_labels": 4,
        },
        _images,
    ),
    "depth_anything": (
        "DepthAnythingConfig",
        "DepthAnythingForDepthEstimation",
        {
            "backbone_config": {
                "model_type": "dinov2",
                "hidden_size": 32,
                "num_hidden_layers": 4,
                "num_attention_heads": 2,
                "intermediate_size": 64,
                "image_size": 64,
                "patch_size": 8,
                "out_features": ["stage1", "stage2", "stage3", "stage4"],
                "reshape_hidden_states": False,
            },
            "reassemble_hidden_size": 32,
            "neck_hidden_sizes": [16, 32, 32, 32],
            "fusion_hidden_size": 32,
            "head_hidden_size": 16,
            "patch_size": 8,
        },
        _images,
    ),
}
"""name -> (config class, model class, config, inputs(n, generator)) in ``transformers``."""

TIMM: dict[str, int] = {
    "resnet18": 64,
    "resnet50d": 64,
    "resnetv2_50x1_bit": 64,
    "nf_resnet26": 64,
    "efficientnet_b0": 64,
    "tf_efficientnet_b0": 64,
    "mobilenetv3_large_100": 64,
    "regnety_002": 64,
    "convnextv2_atto": 64,
    "ghostnet_100": 64,
    "mixnet_s": 64,
    "rexnet_100": 64,
    "dla34": 64,
    "efficientvit_b0": 64,
    "fastvit_t8": 64,
    "mobilevitv2_050": 64,
    "poolformer_s12": 64,
    "edgenext_xx_small": 64,
    "repvgg_a0": 64,
    "hgnetv2_b0": 64,
    "inception_next_atto": 64,
    "levit_128s": 224,
    "deit_tiny_patch16_224": 224,
}
"""timm model name -> image size (``--family timm``: run it in the torchvision/timm venv,
``scripts/models_venv.sh``; PyPI's torchvision does not load beside the pinned torch)."""

_SEGMENTATION = {"num_classes": 4, "weights_backbone": None}
TORCHVISION: dict[str, tuple[str, dict[str, Any], tuple[int, ...]]] = {
    "fcn_resnet50": ("fcn_resnet50", {**_SEGMENTATION, "aux_loss": False}, (3, 64, 64)),
    "deeplabv3_mobilenet_v3_large": ("deeplabv3_mobilenet_v3_large", _SEGMENTATION, (3, 64, 64)),
    "lraspp_mobilenet_v3_large": ("lraspp_mobilenet_v3_large", _SEGMENTATION, (3, 64, 64)),
    "r3d_18": ("r3d_18", {"num_classes": 5}, (3, 4, 32, 32)),  # Conv3d video classifiers
    "r2plus1d_18": ("r2plus1d_18", {"num_classes": 5}, (3, 4, 32, 32)),
    "shufflenet_v2_x0_5": ("shufflenet_v2_x0_5", {"num_classes": 5}, (3, 64, 64)),
    "squeezenet1_1": ("squeezenet1_1", {"num_classes": 5}, (3, 64, 64)),
    "googlenet": (
        "googlenet",
        {"num_classes": 5, "aux_logits": False, "init_weights": True},
        (3, 64, 64),
    ),
    "mnasnet0_5": ("mnasnet0_5", {"num_classes": 5}, (3, 64, 64)),
    "regnet_y_400mf": ("regnet_y_400mf", {"num_classes": 5}, (3, 64, 64)),
    "swin_t": ("swin_t", {"num_classes": 5}, (3, 64, 64)),
    "ssdlite320_mobilenet_v3_large": (  # a detector: its raw predictions (RawPredictions)
        "ssdlite320_mobilenet_v3_large",
        {"num_classes": 4, "weights_backbone": None},
        (3, 160, 160),
    ),
    "retinanet_resnet50_fpn": (
        "retinanet_resnet50_fpn",
        {"num_classes": 4, "weights_backbone": None},
        (3, 96, 96),
    ),
    "vision_transformer": (  # nn.MultiheadAttention: its in-projection split into Linears
        "VisionTransformer",
        {  # ViT-Tiny's widths (192, 3 heads, 768), 4 of its 12 blocks, 64 patches
            "image_size": 64,
            "patch_size": 8,
            "num_layers": 4,
            "num_heads": 3,
            "hidden_dim": 192,
            "mlp_dim": 768,
            "num_classes": 5,
        },
        (3, 64, 64),
    ),
}
"""name -> (builder in ``torchvision.models``, its arguments, one sample's shape)
(``--family torchvision``, in the venv of ``scripts/models_venv.sh``). A model holding an
``nn.MultiheadAttention`` goes through :func:`mpsearch.split_attention` first, as its
coverage note says to; a detector through :class:`RawPredictions`, as the README says."""


class RawPredictions(torch.nn.Module):
    """A torchvision SSD / RetinaNet / FCOS detector's predictions before anchor decoding and
    non-maximum suppression, on images its ``transform`` already normalized and resized: every
    anchor's class logits and box regression, ``[batch, anchors, classes + 4]`` (the README's
    'Detection models')."""

    def __init__(self, detector: torch.nn.Module) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = list(self.detector.backbone(images).values())
        predicted = self.detector.head(features)
        return torch.cat([predicted["cls_logits"], predicted["bbox_regression"]], dim=-1)


FAMILIES = {"hf": ARCHITECTURES, "timm": TIMM, "torchvision": TORCHVISION}
TITLES = {"hf": "Hugging Face", "timm": "timm", "torchvision": "torchvision"}


def build(name: str) -> tuple[torch.nn.Module, Inputs]:
    """The architecture's model (random weights, eval mode) and its input maker."""
    torch.manual_seed(0)
    if name in TORCHVISION:
        import torchvision

        import mpsearch as mps

        builder, kwargs, shape = TORCHVISION[name]
        if builder in torchvision.models.list_models():  # segmentation and video ones too
            model = torchvision.models.get_model(builder, weights=None, **kwargs)
        else:
            model = getattr(torchvision.models, builder)(**kwargs)
        if any(isinstance(m, torch.nn.MultiheadAttention) for m in model.modules()):
            model = mps.split_attention(model)
        if hasattr(model, "anchor_generator"):
            model = RawPredictions(model)
        return model.eval(), lambda n, g: torch.randn(n, *shape, generator=g)
    if name in TIMM:
        import timm

        size = TIMM[name]
        model = timm.create_model(name, pretrained=False, num_classes=10)
        return model.eval(), lambda n, g: torch.randn(n, 3, size, size, generator=g)
    import transformers

    config_name, model_name, config, inputs = ARCHITECTURES[name]
    model = getattr(transformers, model_name)(getattr(transformers, config_name)(**config))
    return model.eval(), inputs


def run_one(name: str, *, trials: int) -> dict[str, Any]:
    """The pipeline on one architecture, in this process: what was seen, the failing step."""
    import mpsearch as mps
    from mpsearch.cost import held_bytes
    from mpsearch.export import ExportError
    from mpsearch.layers import coverage

    model, inputs = build(name)
    g = torch.Generator().manual_seed(0)
    calib = [inputs(16, g) for _ in range(CALIB_BATCHES)]
    example, eval_data = inputs(4, g), [inputs(4, g) for _ in range(2)]
    cover = coverage(model)
    row: dict[str, Any] = {
        "model": name,
        "params": cover.total_params,
        "coverage": round(cover.covered_params / cover.total_params, 3),
    }
    step, started = "profile", time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            passes = [forward_time(model, calib)[0] for _ in range(4)][1:]  # warmed up
            t0 = time.perf_counter()
            # a detector's class logits and box offsets share one tensor: the README's "mse"
            metric = "mse" if isinstance(model, RawPredictions) else None
            prof = mps.profile(model, calib, schemes=SCHEMES, metric=metric, progress=False)
            profile_s = time.perf_counter() - t0
            row["runner"] = prof.info.get("runner")
            row["metric"] = prof.e2e_metric
            row["profile_ratio"] = profile_s / (len(SCHEMES) * statistics.median(passes))
            step = "measure_cost"
            cost = mps.measure_cost(
                model, example, schemes=["fp32", *SCHEMES], backend="cpu", repeats=3, warmup=1
            )
            step = "search"
            res = mps.search(
                model, profile=prof, cost=cost, eval_data=eval_data, n_trials=trials, seed=0
            )
            step = "quantize"
            exact = []
            for plan in (res.best(), *(uniform(cost, s) for s in ("w8a8", "w4a16"))):
                # calib shows the layers whose weights the model reads besides calling them
                # (DAC's codebooks): they stay fp32, as the cost model prices them
                quantized = mps.quantize(model, plan, backend=cost.backend, calib=calib[:1])
                exact.append(cost.memory_bytes(plan) == held_bytes(quantized))
            row["memory_exact"] = f"{sum(exact)}/{len(exact)}"
            step = "export"
            formats = [f for f in FORMATS if f != "onnx" or ONNX_INSTALLED]
            if len(formats) < len(FORMATS):
                row["note"] = "onnx: onnx, onnxscript or onnxruntime not installed here"
            with tempfile.TemporaryDirectory() as out:
                try:
                    written = mps.export_plan(
                        model,
                        res.best(),
                        out,
                        example_input=example,
                        formats=formats,
                        check_inputs=eval_data,
                    )
                    records = written.records
                except ExportError as error:  # some formats written and checked
                    records = error.result.records
                    row["note"] = "; ".join(f"{f}: {why}" for f, why in error.failures.items())[
                        :160
                    ]
            row["formats"] = ", ".join(r.format for r in records)
            row["export_top1"] = export_agreement(records)
        row["pipeline"] = "ok"
    except Exception as error:  # the failing step and why, for the table
        row["pipeline"] = f"failed at {step}"
        row["note"] = f"{type(error).__name__}: {error}".replace("\n", " ")[:200]
        traceback.print_exc()
    row["seconds"] = round(time.perf_counter() - started, 1)
    return row


def uniform(cost: Any, scheme: str) -> Any:
    """Every layer in ``scheme``, those the backend runs no kernel of it for in bf16 (a
    transposed convolution has no int8 x int8 one on ``cpu``)."""
    import mpsearch as mps

    plan = mps.PrecisionPlan({}, default=scheme)
    chosen = plan.resolve(cost.model)
    kept = {n: "bf16" for n, s in chosen.items() if n in cost.layers and not cost.supported(n, s)}
    return mps.PrecisionPlan(kept, default=scheme)


def export_agreement(records: list[Any]) -> float:
    """The lowest top-1 agreement of the exported files with what they were written from on
    the check inputs, the torch.export program's simulated layers also against the real
    kernels (NaN when no file was checked on outputs)."""
    found = [r.top1_agreement for r in records if r.top1_agreement is not None]
    found += [r.details["agree_vs_real"] for r in records if "agree_vs_real" in r.details]
    return min(found, default=float("nan"))


def row_in_subprocess(name: str, *, trials: int) -> dict[str, Any]:
    """:func:`run_one` in a fresh process (one architecture cannot break the next)."""
    done = subprocess.run(
        [sys.executable, __file__, "--one", name, "--trials", str(trials)],
        capture_output=True,
        text=True,
        check=False,
    )
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode != 0 or not lines:
        return {
            "model": name,
            "pipeline": f"process exited {done.returncode}",
            "note": done.stderr.strip().splitlines()[-1][:200] if done.stderr else "",
        }
    return json.loads(lines[-1])


COLUMNS = [
    "model",
    "params",
    "coverage",
    "runner",
    "metric",
    "profile_ratio",
    "pipeline",
    "memory_exact",
    "formats",
    "export_top1",
    "seconds",
    "note",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=sorted(FAMILIES), default="hf")
    parser.add_argument("--models", help="comma-separated (default: the family's all)")
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--out", type=Path, help="the markdown table written")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # run one, print its row as JSON
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.one:
        print(json.dumps(run_one(args.one, trials=args.trials)), flush=True)
        return
    from mpsearch.cost import cpu_model

    family = FAMILIES[args.family]
    names = model_names(parser, args.models or ",".join(family), family)
    suffix = "" if args.family == "hf" else f"_{args.family}"
    out = args.out or RESULTS.with_name(f"architectures{suffix}.md")
    started = time.perf_counter()
    rows = []
    for name in names:
        rows.append(row_in_subprocess(name, trials=args.trials))
        print(rows[-1], flush=True)
    ok = [r for r in rows if r["pipeline"] == "ok"]
    exact = [r for r in ok if r.get("memory_exact") == "3/3"]
    ratios = [r["profile_ratio"] for r in rows if "profile_ratio" in r]
    summary = (
        f"{len(ok)} of {len(rows)} architectures ran the whole pipeline; the cost model's bytes "
        f"equal the quantized model's on {len(exact)} of them (best, uniform w8a8 and w4a16 "
        "plans); profile / (S x fp32 pass): median "
        f"{statistics.median(ratios):.2f}, max {max(ratios):.2f}; exported files' top-1 "
        f"agreement with what they were written from: min "
        f"{min((r['export_top1'] for r in ok if 'export_top1' in r), default=float('nan')):.3f}"
        if ratios
        else "no architecture was profiled"
    )
    print(summary)
    text = "\n".join(
        [
            f"# {TITLES[args.family]} architectures through the whole pipeline",
            "",
            f"CPU: {cpu_model()}; torch {torch.__version__}, 1 thread; schemes {SCHEMES}; "
            f"{args.trials} trials per search; wall time {time.perf_counter() - started:.0f} s. "
            "Generated by `benchmarks/bench_architectures.py`.",
            "",
            "Each model is built from a small config (random weights) and run in its own "
            "process: profile -> measure_cost (cpu) -> search -> quantize (cpu, the measured "
            "kernels) -> export. `coverage`: share of parameters in quantizable layers; "
            "`runner`: the profiler's runner; `metric`: the end-to-end metric the profile "
            "chose for the model's output (`auto_metric`; `mse` given for the detectors' raw predictions); `profile_ratio`: profile seconds / (S x one fp32 "
            f"pass over the same {CALIB_BATCHES} calibration batches of 16; one profile: noisy); `memory_exact`: plans whose "
            "`cost.memory_bytes` equals the bytes the quantized model holds; `formats`: export "
            "formats written and checked; `export_top1`: the lowest top-1 agreement of an "
            "exported file with the model it was written from on the evaluation batches (the "
            "torch.export program's simulated w8a8 layers also against the real kernels); "
            "`note`: the error where a step or format failed.",
            "",
            summary + ".",
            "",
            md_table(rows, COLUMNS),
            "",
        ]
    )
    write_result(out, text)


if __name__ == "__main__":
    main()
