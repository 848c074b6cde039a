"""Other people's models: small random-initialised configs of architectures users bring.

Each zoo workload is a model built from a config (no download), fixed random inputs in the
shape the model takes (token ids with an attention mask for Hugging Face models, images for
vision models, feature frames for the speaker encoder), and quality = top-1 agreement with the
fp32 model's own predictions on the test inputs. Hugging Face models need the optional
``transformers`` package (``pip install -e ".[models]"``); without it their names are still
listed in :data:`ZOO` and :func:`zoo_workload` says what to install.

>>> wl = load_workload("hf_gpt2")  # doctest: +SKIP
>>> wl.evaluate(wl.model)  # doctest: +SKIP
1.0
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mpsearch._data import Batch
from mpsearch.workloads._base import Task, Workload, _logits, register_workload, take

VOCAB = 512
SEQ_LEN = 32
N_TEST = 64
AUDIO_SAMPLES = 8000  # 0.5 s at 16 kHz


@dataclass(frozen=True)
class ZooEntry:
    """How to build one zoo model and its inputs.

    ``build(seed)`` returns the model in eval mode; ``inputs(n, generator)`` returns ``n``
    samples as one batch (a tensor or a dict of tensors); ``needs`` names the optional
    package the model comes from (``None``: plain PyTorch).
    """

    build: Callable[[int], nn.Module]
    inputs: Callable[[int, torch.Generator], Batch]
    task: Task
    needs: str | None = None
    note: str = ""


def _tokens(n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (n, SEQ_LEN), generator=generator)
    mask = torch.ones(n, SEQ_LEN, dtype=torch.long)
    lengths = torch.randint(SEQ_LEN // 2, SEQ_LEN + 1, (n,), generator=generator)
    mask[torch.arange(SEQ_LEN)[None, :] >= lengths[:, None]] = 0  # right padding
    return {"input_ids": ids, "attention_mask": mask}


DECODER_TOKENS = SEQ_LEN // 4
MEL_BINS, MEL_FRAMES = 40, 200


def _seq2seq(n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """An encoder-decoder's inputs: the encoder's tokens and the decoder's first tokens."""
    batch = _tokens(n, generator)
    batch["decoder_input_ids"] = torch.randint(0, VOCAB, (n, DECODER_TOKENS), generator=generator)
    return batch


def _speech(n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A speech recogniser's inputs: log-mel frames and the decoder's first tokens."""
    return {
        "input_features": torch.randn(n, MEL_BINS, MEL_FRAMES, generator=generator),
        "decoder_input_ids": torch.randint(0, VOCAB, (n, DECODER_TOKENS), generator=generator),
    }


def _images(size: int, channels: int = 3) -> Callable[[int, torch.Generator], Batch]:
    def make(n: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randn(n, channels, size, size, generator=generator)

    return make


def _seeded(seed: int) -> None:
    torch.manual_seed(seed)


def _hf(config_name: str, model_name: str, **config: Any) -> Callable[[int], nn.Module]:
    def build(seed: int) -> nn.Module:
        import transformers

        _seeded(seed)
        cfg = getattr(transformers, config_name)(**config)
        return getattr(transformers, model_name)(cfg).eval()

    return build


_LM = {"vocab_size": VOCAB, "use_cache": False}
_DECODER = {  # a small Llama-style decoder with tied embeddings (Llama and Qwen2 configs)
    "num_hidden_layers": 2,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": SEQ_LEN,
    "tie_word_embeddings": True,
    "bos_token_id": 0,
    "eos_token_id": 0,
    "pad_token_id": 0,
    **_LM,
}

ZOO: dict[str, ZooEntry] = {
    "hf_gpt2": ZooEntry(
        _hf(
            "GPT2Config",
            "GPT2LMHeadModel",
            n_layer=2,
            n_embd=128,
            n_head=4,
            n_positions=SEQ_LEN,
            bos_token_id=0,
            eos_token_id=0,
            **_LM,
        ),
        _tokens,
        "language_model",
        needs="transformers",
        note="GPT-2: Conv1D projections (transposed Linear), tied embeddings",
    ),
    "hf_llama": ZooEntry(
        _hf(
            "LlamaConfig",
            "LlamaForCausalLM",
            **_DECODER,
        ),
        _tokens,
        "language_model",
        needs="transformers",
        note="Llama-style causal LM (GQA, RMSNorm, SwiGLU), tied embeddings",
    ),
    "hf_qwen2": ZooEntry(
        _hf(
            "Qwen2Config",
            "Qwen2ForCausalLM",
            **_DECODER,
        ),
        _tokens,
        "language_model",
        needs="transformers",
        note="Qwen2 causal LM (q/k/v biases), tied embeddings",
    ),
    "hf_mixtral": ZooEntry(
        _hf(
            "MixtralConfig",
            "MixtralForCausalLM",
            **{**_DECODER, "intermediate_size": 128},
            num_local_experts=4,
            num_experts_per_tok=2,
        ),
        _tokens,
        "language_model",
        needs="transformers",
        note="Mixtral sparse Mixture-of-Experts causal LM: each layer's 4 experts one bank of "
        "3-D weights (70% of the parameters), top-2 routing",
    ),
    "hf_bert": ZooEntry(
        _hf(
            "BertConfig",
            "BertForSequenceClassification",
            num_hidden_layers=2,
            hidden_size=128,
            intermediate_size=256,
            num_attention_heads=4,
            max_position_embeddings=SEQ_LEN,
            vocab_size=VOCAB,
            num_labels=4,
            pad_token_id=0,
        ),
        _tokens,
        "classification",
        needs="transformers",
        note="BERT sequence classifier",
    ),
    "hf_t5": ZooEntry(
        _hf(
            "T5Config",
            "T5ForConditionalGeneration",
            d_model=128,
            d_kv=32,
            d_ff=256,
            num_layers=2,
            num_heads=4,
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=0,
            **_LM,
        ),
        _seq2seq,
        "language_model",
        needs="transformers",
        note="T5 encoder-decoder: relative position biases, a shared embedding the model "
        "never calls (its encoder's and decoder's copies are called)",
    ),
    "hf_whisper": ZooEntry(
        _hf(
            "WhisperConfig",
            "WhisperForConditionalGeneration",
            d_model=128,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=256,
            decoder_ffn_dim=256,
            num_mel_bins=MEL_BINS,
            max_source_positions=MEL_FRAMES // 2,
            max_target_positions=SEQ_LEN,
            pad_token_id=0,
            bos_token_id=0,
            eos_token_id=0,
            decoder_start_token_id=0,
            **_LM,
        ),
        _speech,
        "language_model",
        needs="transformers",
        note="Whisper speech recogniser: strided Conv1d front end on log-mel frames; the "
        "model reads its convs' stride and its position embedding's size",
    ),
}


class FlagNet(nn.Module):
    """Research-code style: ``forward(x, embed=False)`` with one ``if embed:`` branch."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)  # fan-in 9: below any 4-bit group
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, groups=4)  # grouped
        self.conv3 = nn.Conv2d(16, 16, 3, padding=1, groups=16)  # depthwise
        self.fc = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor, embed: bool = False) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = torch.relu(self.conv3(x)).mean((2, 3))
        if embed:
            return x
        return self.fc(x)


class SpeakerEncoder(nn.Module):
    """A speaker encoder: 3-layer LSTM over feature frames, then one Linear (most weights in
    the LSTM)."""

    def __init__(self, n_mels: int = 40, hidden: int = 128, embed: int = 64) -> None:
        super().__init__()
        self.lstm = nn.LSTM(n_mels, hidden, num_layers=3, batch_first=True)
        self.proj = nn.Linear(hidden, embed)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(frames)
        return self.proj(out[:, -1])


class CellDecoder(nn.Module):
    """Research-code recurrence: an ``nn.LSTMCell`` and an ``nn.GRUCell`` stepped over the
    frames in a Python loop, each called with its state, then one Linear."""

    def __init__(self, features: int = 40, hidden: int = 96, classes: int = 10) -> None:
        super().__init__()
        self.hidden = hidden
        self.lstm = nn.LSTMCell(features, hidden)
        self.gru = nn.GRUCell(hidden, hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        h = frames.new_zeros(frames.shape[0], self.hidden)
        c, g = torch.zeros_like(h), torch.zeros_like(h)
        for t in range(frames.shape[1]):
            h, c = self.lstm(frames[:, t], (h, c))
            g = self.gru(h, g)
        return self.head(g)


class AttentionNet(nn.Module):
    """Patch embedding + ``nn.MultiheadAttention`` (bare ``in_proj_weight``, ``out_proj`` a
    ``Linear`` subclass) + classifier."""

    def __init__(self, dim: int = 64, classes: int = 10) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.attn = nn.MultiheadAttention(dim, 4, batch_first=True)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        mixed, _ = self.attn(tokens, tokens, tokens, need_weights=False)
        return self.head((tokens + mixed).mean(1))


class AudioCNN(nn.Module):
    """A raw-waveform audio classifier: 1-D convolutions with long kernels (512 taps on one
    input channel first), strides 8-2, then a mean over time and one Linear (about 0.12 GFLOP
    per 0.5 s clip at 16 kHz)."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        shapes = [(1, 32, 512, 8), (32, 64, 32, 4), (64, 128, 16, 2), (128, 128, 8, 2)]
        self.convs = nn.ModuleList(
            nn.Conv1d(cin, cout, k, stride=s, padding=k // 2) for cin, cout, k, s in shapes
        )
        self.head = nn.Linear(128, classes)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        x = wave
        for conv in self.convs:
            x = torch.relu(conv(x))
        return self.head(x.mean(-1))


def _plain(cls: type[nn.Module]) -> Callable[[int], nn.Module]:
    def build(seed: int) -> nn.Module:
        _seeded(seed)
        return cls().eval()

    return build


ZOO.update(
    {
        "flag_net": ZooEntry(
            _plain(FlagNet),
            _images(16, channels=1),
            "classification",
            note="forward(x, embed=False) with an if; 1-channel, grouped and depthwise convs",
        ),
        "speaker_lstm": ZooEntry(
            _plain(SpeakerEncoder),
            lambda n, g: torch.randn(n, 20, 40, generator=g),
            "classification",
            note="3-layer LSTM + Linear",
        ),
        "cell_decoder": ZooEntry(
            _plain(CellDecoder),
            lambda n, g: torch.randn(n, 12, 40, generator=g),
            "classification",
            note="nn.LSTMCell + nn.GRUCell stepped in a loop, each with its state",
        ),
        "attention_net": ZooEntry(
            _plain(AttentionNet),
            _images(32),
            "classification",
            note="nn.MultiheadAttention",
        ),
        "audio_cnn": ZooEntry(
            _plain(AudioCNN),
            lambda n, g: torch.randn(n, 1, AUDIO_SAMPLES, generator=g),
            "classification",
            note="raw-waveform CNN: long 1-D kernels (512 taps, 1 input channel), strides",
        ),
    }
)
"""Zoo models by name (registered as workloads of the same name)."""


def _bn_recalibrated(model: nn.Module, images: torch.Tensor) -> nn.Module:
    """``model`` in eval mode with its BatchNorm statistics measured on ``images``: left at their
    initial values, a random-initialised MobileNetV3 or EfficientNet shrinks its activations
    layer by layer down to logits of ~1e-10 (below fp16's smallest number)."""
    norms = {m: m.momentum for m in model.modules() if isinstance(m, nn.BatchNorm2d)}
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average over the passes
    model.train()
    with torch.no_grad():
        for batch in images.split(16):
            model(batch)
    for norm, momentum in norms.items():
        norm.momentum = momentum
    return model.eval()


def _torchvision(model_name: str, size: int, **kwargs: Any) -> Callable[[int], nn.Module]:
    def build(seed: int) -> nn.Module:
        import torchvision

        _seeded(seed)
        model = getattr(torchvision.models, model_name)(weights=None, **kwargs)
        images = _images(size)(64, torch.Generator().manual_seed(seed))
        return _bn_recalibrated(model, images)

    return build


def _timm(model_name: str, **kwargs: Any) -> Callable[[int], nn.Module]:
    def build(seed: int) -> nn.Module:
        import timm

        _seeded(seed)
        return timm.create_model(model_name, pretrained=False, **kwargs).eval()

    return build


# torchvision / timm do not load beside the pinned torch: scripts/models_venv.sh makes a venv
# where they do (tests/workloads/test_zoo_vision.py runs them there).
ZOO.update(
    {
        "tv_resnet18": ZooEntry(
            _torchvision("resnet18", 32, num_classes=10),
            _images(32),
            "classification",
            needs="torchvision",
            note="torchvision ResNet-18: BatchNorm, residual adds, max pool",
        ),
        "tv_mobilenet_v3_small": ZooEntry(
            _torchvision("mobilenet_v3_small", 32, num_classes=10),
            _images(32),
            "classification",
            needs="torchvision",
            note="torchvision MobileNetV3-small: depthwise convs, squeeze-excitation, hardswish",
        ),
        "tv_efficientnet_b0": ZooEntry(
            _torchvision("efficientnet_b0", 32, num_classes=10),
            _images(32),
            "classification",
            needs="torchvision",
            note="torchvision EfficientNet-B0: MBConv, squeeze-excitation, SiLU, stochastic depth",
        ),
        "timm_vit_tiny": ZooEntry(
            _timm("vit_tiny_patch16_224", num_classes=10, img_size=32),
            _images(32),
            "classification",
            needs="timm",
            note="timm ViT-Tiny/16 at 32x32 (4 patches + class token): fused qkv Linear, SDPA",
        ),
    }
)


_VISION_VENV = (
    "bash scripts/models_venv.sh makes a separate venv with a torch/torchvision pair that load "
    "together (installed beside the pinned torch, PyPI's torchvision breaks the environment)"
)
_INSTALL = {
    "transformers": "pip install -e '.[models]'",
    "torchvision": _VISION_VENV,
    "timm": _VISION_VENV,
}


def zoo_available(name: str) -> bool:
    """Whether the optional package zoo model ``name`` needs is installed."""
    needs = ZOO[name].needs
    return needs is None or importlib.util.find_spec(needs) is not None


def zoo_workload(
    name: str, *, seed: int = 0, n_calib: int = 64, n_test: int | None = None, batch_size: int = 16
) -> Workload:
    """The zoo model ``name`` as a :class:`Workload`: fixed random inputs (calibration and test
    drawn from one generator seeded with ``seed``), quality = agreement with its fp32 outputs."""
    entry = ZOO[name]
    if not zoo_available(name):
        raise ModuleNotFoundError(
            f"The zoo model {name!r} needs the optional package {entry.needs!r}: "
            f"{_INSTALL.get(entry.needs, f'pip install {entry.needs}')}."
        )
    model = entry.build(seed)
    generator = torch.Generator().manual_seed(seed + 1)
    n_test = take("n_test", n_test, 4096, default=N_TEST)

    def batches(n: int) -> list[Batch]:
        sizes = [min(batch_size, n - i) for i in range(0, n, batch_size)]
        return [entry.inputs(size, generator) for size in sizes]

    calib, test = batches(n_calib), batches(n_test)
    with torch.inference_mode():  # what evaluate compares against: top-1 of the same logits
        reference = [_logits(model, b).argmax(dim=-1) for b in test]
    workload = Workload(
        name=name,
        model=model,
        calib=calib,
        test=test,
        test_labels=None,
        example_input=test[0],
        task=entry.task,
        reference=reference,
        info={"source": entry.needs or "torch", "note": entry.note, "seed": seed},
    )
    workload.info["fp32_quality"] = workload.evaluate(model)
    return workload


def _register(name: str) -> None:
    @register_workload(name)
    def build(
        *, seed: int, cache_dir: Path, n_calib: int, n_test: int | None, batch_size: int
    ) -> Workload:
        del cache_dir  # nothing trained, nothing cached
        return zoo_workload(name, seed=seed, n_calib=n_calib, n_test=n_test, batch_size=batch_size)


for _name in ZOO:
    _register(_name)
