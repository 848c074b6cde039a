"""A Llama-architecture causal LM trained on the Python standard library's own source files.

The corpus is every ``*.py`` file under the running interpreter's ``stdlib`` directory
(``sysconfig.get_paths()["stdlib"]``, site-packages and dist-packages excluded: about 1,800
files, 30 MB of real code), split *by file* into train / calibration / held-out test by a hash
of each file's relative path, so the split is the same on every call and every machine with
the same Python. A byte-level BPE tokenizer (``tokenizers``) is trained on the train split and
cached as JSON beside the weights; a ``transformers`` ``LlamaForCausalLM`` (RMSNorm, rotary
positions, SwiGLU, grouped-query attention) is trained within a step and wall-clock budget and
cached. Batches are ``{"input_ids": LongTensor [B, T]}`` windows cut from the concatenated
token stream of a split (files separated by an end-of-text token); quality is held-out
perplexity, reported by ``evaluate`` as ``-log(perplexity)`` so that higher is better.

>>> wl = load_workload("stdlib_lm_tiny")  # doctest: +SKIP
>>> math.exp(-wl.evaluate(wl.model)) == perplexity(wl.model, wl.test)  # doctest: +SKIP
True
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import sysconfig
import tempfile
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.nn import functional as F

from mpsearch._data import Batch, output_tensor, run_model
from mpsearch._validation import invalid, unknown
from mpsearch.workloads._base import Workload, check_int, register_workload, take
from mpsearch.workloads._cache import CacheWarning, fingerprint, load_or_train

EOT = "<|endoftext|>"
"""The special token that separates files in a token stream (and ends generation)."""

SPLITS: tuple[str, ...] = ("train", "calib", "test")
TOKENIZERS: tuple[str, ...] = ("bpe", "byte")
EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages"})
N_TEST = 64
"""Default number of held-out test windows (``n_test=None``)."""


@dataclass(frozen=True)
class StdlibLMConfig:
    """Tokenizer, model and training budget of the stdlib LM workload (all part of the cache key).

    ``tokenizer="bpe"`` trains a byte-level BPE of ``vocab_size`` tokens on the train split;
    ``"byte"`` uses the 256 byte values plus the end-of-text token (``vocab_size`` ignored).
    ``max_train_files`` keeps only the first files of the train split (in hash order; ``None``:
    all), for small test configurations. Training stops after ``max_train_steps`` steps or
    ``max_train_seconds`` seconds of optimisation, whichever comes first; the learning rate
    follows a warm-up and a cosine decay over whichever budget is nearer to running out.

    >>> StdlibLMConfig().seq_len
    256
    """

    hidden_size: int = 384
    n_layers: int = 6
    n_heads: int = 6
    n_kv_heads: int = 2
    intermediate_size: int = 1024
    tokenizer: Literal["bpe", "byte"] = "bpe"
    vocab_size: int = 4096
    seq_len: int = 256
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)
    max_train_files: int | None = None
    max_train_steps: int = 4000
    max_train_seconds: float = 1800.0
    train_batch: int = 8
    lr: float = 2e-3
    min_lr_fraction: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        if self.tokenizer not in TOKENIZERS:
            raise unknown("tokenizer", self.tokenizer, TOKENIZERS)
        for argument in ("hidden_size", "n_layers", "n_heads", "n_kv_heads", "intermediate_size"):
            check_int(argument, getattr(self, argument), minimum=1)
        check_int("vocab_size", self.vocab_size, minimum=257)
        check_int("seq_len", self.seq_len, minimum=2)
        check_int("max_train_steps", self.max_train_steps, minimum=1)
        check_int("train_batch", self.train_batch, minimum=1)
        check_int("warmup_steps", self.warmup_steps, minimum=0)
        if self.max_train_files is not None:
            check_int("max_train_files", self.max_train_files, minimum=1)
        if self.hidden_size % self.n_heads or self.n_heads % self.n_kv_heads:
            raise invalid(
                "n_heads",
                self.n_heads,
                f"a divisor of hidden_size={self.hidden_size} and a multiple of "
                f"n_kv_heads={self.n_kv_heads}",
            )
        if (
            len(self.split) != 3
            or any(f <= 0 for f in self.split)
            or abs(sum(self.split) - 1) > 1e-9
        ):
            raise invalid("split", self.split, "three positive fractions summing to 1")
        if not self.max_train_seconds > 0:
            raise invalid("max_train_seconds", self.max_train_seconds, "a positive number")


STDLIB_LM_CONFIG = StdlibLMConfig()
"""The full configuration: ~12.6 M parameters, BPE-4096, windows of 256 tokens."""

TINY_CONFIG = StdlibLMConfig(
    hidden_size=64,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    intermediate_size=128,
    vocab_size=512,
    seq_len=64,
    max_train_files=24,
    max_train_steps=100,
    max_train_seconds=60.0,
    train_batch=8,
    lr=3e-3,
    warmup_steps=5,
)
"""A configuration for tests: 2 layers of width 64, BPE-512 on 24 files, 100 steps."""


# ---------------------------------------------------------------------------------- corpus


def stdlib_root() -> Path:
    """The running interpreter's standard-library directory (``sysconfig``'s ``stdlib`` path).

    >>> (stdlib_root() / "json" / "__init__.py").exists()
    True
    """
    return Path(sysconfig.get_paths()["stdlib"])


def split_of(relative_path: str, fractions: Sequence[float] = STDLIB_LM_CONFIG.split) -> str:
    """The split (``"train"``, ``"calib"`` or ``"test"``) of a file, from a hash of its path.

    The first 64 bits of the SHA-256 of the POSIX relative path, as a fraction of 2**64,
    fall in one of the consecutive intervals given by ``fractions``.

    >>> split_of("json/__init__.py") in SPLITS
    True
    """
    digest = hashlib.sha256(relative_path.encode("utf-8")).digest()
    position = int.from_bytes(digest[:8], "big") / 2**64
    edge = 0.0
    for name, fraction in zip(SPLITS[:-1], fractions[:-1], strict=True):
        edge += fraction
        if position < edge:
            return name
    return SPLITS[-1]


def _order_key(relative_path: str) -> str:
    return hashlib.sha256(f"order:{relative_path}".encode()).hexdigest()


@cache
def stdlib_files(
    fractions: tuple[float, float, float] = STDLIB_LM_CONFIG.split,
) -> dict[str, tuple[str, ...]]:
    """The standard library's ``*.py`` files (relative POSIX paths) of each split.

    Files under ``site-packages`` or ``dist-packages`` are left out. Within a split the files
    are in a fixed pseudo-random order (a hash of the path), so that the first windows of a
    split mix many modules.

    >>> files = stdlib_files()
    >>> sum("json/__init__.py" in files[s] for s in SPLITS)
    1
    """
    root = stdlib_root()
    paths = [p.relative_to(root).as_posix() for p in root.rglob("*.py") if p.is_file()]
    paths = [p for p in paths if not EXCLUDED_DIRS & set(p.split("/"))]
    by_split: dict[str, list[str]] = {name: [] for name in SPLITS}
    for path in paths:
        by_split[split_of(path, fractions)].append(path)
    return {name: tuple(sorted(files, key=_order_key)) for name, files in by_split.items()}


def _read(relative_path: str) -> str:
    return (stdlib_root() / relative_path).read_text(encoding="utf-8", errors="replace")


@cache
def _digest(files: tuple[str, ...]) -> str:
    hasher = hashlib.sha256()
    for path in files:
        hasher.update(path.encode("utf-8") + b"\0" + _read(path).encode("utf-8") + b"\0")
    return hasher.hexdigest()[:16]


def _train_files(config: StdlibLMConfig) -> tuple[str, ...]:
    files = stdlib_files(config.split)["train"]
    return files if config.max_train_files is None else files[: config.max_train_files]


# ------------------------------------------------------------------------------- tokenizer


@dataclass(frozen=True)
class StdlibTokenizer:
    """Text to token ids: byte-level BPE (a ``tokenizers.Tokenizer``) or raw UTF-8 bytes.

    >>> tok = StdlibTokenizer.byte_level()
    >>> tok.decode(tok.encode(["déf"])[0])
    'déf'
    """

    kind: Literal["bpe", "byte"]
    vocab_size: int
    eot_id: int
    bpe: Any = field(default=None, compare=False)
    digest: str = ""

    @classmethod
    def byte_level(cls) -> StdlibTokenizer:
        """The byte-level tokenizer: ids 0-255 are bytes, 256 is the end-of-text token."""
        return cls(kind="byte", vocab_size=257, eot_id=256, digest="byte")

    @classmethod
    def from_json(cls, text: str) -> StdlibTokenizer:
        """A BPE tokenizer from its ``tokenizers`` JSON serialisation."""
        from tokenizers import Tokenizer

        bpe = Tokenizer.from_str(text)
        eot = bpe.token_to_id(EOT)
        if eot is None:
            raise ValueError(f"the tokenizer has no {EOT!r} token")
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
        return cls(kind="bpe", vocab_size=bpe.get_vocab_size(), eot_id=eot, bpe=bpe, digest=digest)

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text (no special tokens added)."""
        if self.bpe is None:
            return [list(text.encode("utf-8")) for text in texts]
        return [encoding.ids for encoding in self.bpe.encode_batch(list(texts))]

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids`` (the end-of-text token is dropped)."""
        ids = [i for i in ids if i != self.eot_id]
        if self.bpe is None:
            return bytes(ids).decode("utf-8", errors="replace")
        return self.bpe.decode(ids)


def _train_bpe(files: Sequence[str], vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator((_read(path) for path in files), trainer=trainer, length=len(files))
    return bpe.to_str()


def _write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (a temporary file in the same folder, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            os.fchmod(handle.fileno(), 0o644)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def load_tokenizer(
    config: StdlibLMConfig, *, name: str, cache_dir: Path
) -> tuple[StdlibTokenizer, dict[str, Any]]:
    """The workload's tokenizer, read from ``cache_dir`` or trained on the train split and cached.

    The JSON file is keyed by the tokenizer settings and a digest of the train files, so a
    different Python (other stdlib sources) trains a new one.

    >>> tok, info = load_tokenizer(TINY_CONFIG, name="t", cache_dir=tmp)  # doctest: +SKIP
    """
    if config.tokenizer == "byte":
        return StdlibTokenizer.byte_level(), {"tokenizer": "byte", "tokenizer_seconds": 0.0}
    files = _train_files(config)
    key = fingerprint("stdlib_lm.tokenizer", config.tokenizer, config.vocab_size, _digest(files))
    path = cache_dir / f"{name}-tokenizer-{key}.json"
    if path.exists():
        try:
            tokenizer = StdlibTokenizer.from_json(path.read_text(encoding="utf-8"))
        except Exception as error:  # an unreadable file is retrained, never trusted
            warnings.warn(
                f"Ignoring the unusable tokenizer file {str(path)!r} ({error}); retraining.",
                CacheWarning,
                stacklevel=2,
            )
        else:
            info = {"tokenizer": "bpe", "tokenizer_file": str(path), "tokenizer_from_cache": True}
            return tokenizer, info
    start = time.perf_counter()
    text = _train_bpe(files, config.vocab_size)
    seconds = round(time.perf_counter() - start, 3)
    try:
        _write_text(path, text)
    except OSError as error:
        warnings.warn(
            f"Could not write the tokenizer file {str(path)!r} ({error}).",
            CacheWarning,
            stacklevel=2,
        )
    info = {
        "tokenizer": "bpe",
        "tokenizer_file": str(path),
        "tokenizer_from_cache": False,
        "tokenizer_seconds": seconds,
    }
    return StdlibTokenizer.from_json(text), info


def token_stream(
    tokenizer: StdlibTokenizer, files: Sequence[str], *, min_tokens: int | None = None
) -> torch.Tensor:
    """The token ids of ``files`` concatenated, each file followed by the end-of-text token.

    With ``min_tokens`` the files are encoded in order only until the stream is that long.

    >>> token_stream(StdlibTokenizer.byte_level(), ["json/__init__.py"])[-1].item()
    256
    """
    chunks: list[torch.Tensor] = []
    total = 0
    group = 16  # files encoded together (in parallel by ``tokenizers``)
    for start in range(0, len(files), group):
        texts = [_read(path) for path in files[start : start + group]]
        for ids in tokenizer.encode(texts):
            if min_tokens is not None and total >= min_tokens:
                return torch.cat(chunks)
            chunks.append(torch.tensor([*ids, tokenizer.eot_id], dtype=torch.long))
            total += len(ids) + 1
    return torch.cat(chunks) if chunks else torch.zeros(0, dtype=torch.long)


# ---------------------------------------------------------------------------- model, NLL


def build_model(config: StdlibLMConfig, tokenizer: StdlibTokenizer) -> nn.Module:
    """A fresh ``LlamaForCausalLM`` of ``config`` (untied head; ``use_cache=False`` for batch
    forwards: ``generate`` still decodes with a KV cache when asked ``use_cache=True``).

    >>> build_model(TINY_CONFIG, StdlibTokenizer.byte_level()).config.vocab_size
    257
    """
    import transformers

    llama = transformers.LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads,
        max_position_embeddings=config.seq_len,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.eot_id,
        eos_token_id=tokenizer.eot_id,
        pad_token_id=tokenizer.eot_id,
        use_cache=False,
    )
    return transformers.LlamaForCausalLM(llama).eval()


def _input_ids(batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, Mapping) and "input_ids" in batch:
        return batch["input_ids"], batch.get("attention_mask")
    raise invalid(
        "batches",
        type(batch).__name__,
        "batches of token ids: a LongTensor [B, T] or "
        "a dict with 'input_ids' (and optionally 'attention_mask')",
    )


def nll_sum(model: nn.Module, batches: Iterable[Batch]) -> tuple[float, int]:
    """``(sum of next-token negative log-likelihoods, number of predicted tokens)`` over batches.

    Position ``t`` of each row predicts token ``t + 1``; a prediction counts only where both
    tokens are real (``attention_mask`` is 1 at both; no mask: every token is real). Sums are
    accumulated in float64. Runs without gradients; the model's mode is left as it is.

    >>> nll_sum(model, [{"input_ids": ids}])  # doctest: +SKIP
    (1234.5, 504)
    """
    total = 0.0
    count = 0
    with torch.inference_mode():
        for batch in batches:
            ids, mask = _input_ids(batch)
            logits = output_tensor(run_model(model, batch)).float()
            nll = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]),
                ids[:, 1:].reshape(-1),
                reduction="none",
            ).double()
            if mask is None:
                total += float(nll.sum())
                count += nll.numel()
            else:
                keep = (mask[:, :-1].bool() & mask[:, 1:].bool()).reshape(-1)
                total += float(nll[keep].sum())
                count += int(keep.sum())
    return total, count


def perplexity(model: nn.Module, batches: Iterable[Batch]) -> float:
    """Perplexity of a causal LM: ``exp(sum NLL / number of predicted tokens)`` over all batches.

    ``batches`` hold token ids (``{"input_ids": [B, T]}``, optionally with an
    ``attention_mask`` whose zeros mark padding, or a bare LongTensor); the model returns
    logits ``[B, T, V]`` (or an output with ``.logits``). See :func:`nll_sum`.

    >>> perplexity(wl.model, wl.test)  # doctest: +SKIP
    9.87...
    """
    total, count = nll_sum(model, batches)
    if count == 0:
        raise invalid(
            "batches", "no predicted tokens", "batches with at least 2 real tokens per row"
        )
    return math.exp(total / count)


@dataclass
class PerplexityWorkload(Workload):
    """A language-model workload whose quality is ``-log(perplexity)`` on its ``test`` batches.

    >>> wl.evaluate(wl.model) == -math.log(perplexity(wl.model, wl.test))  # doctest: +SKIP
    True
    """

    def evaluate(self, model: nn.Module) -> float:
        """Minus the mean next-token NLL on ``test`` (``-log`` of the perplexity; higher is
        better), computed in eval mode (the module's mode is restored afterwards)."""
        was_training = model.training
        model.eval()
        try:
            total, count = nll_sum(model, self.test)
        finally:
            model.train(was_training)
        return -total / count


# --------------------------------------------------------------------------------- training


def _train(
    model: nn.Module, tokenizer: StdlibTokenizer, config: StdlibLMConfig, *, seed: int
) -> dict[str, Any]:
    """AdamW on random windows of the train stream, within the step and wall-clock budget."""
    start = time.perf_counter()
    stream = token_stream(tokenizer, _train_files(config))
    encode_seconds = time.perf_counter() - start
    if len(stream) <= config.seq_len:
        raise invalid("max_train_files", config.max_train_files, "enough files for one window")
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": config.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=config.lr,
        betas=(0.9, 0.95),
    )
    generator = torch.Generator().manual_seed(seed + 1)
    span = torch.arange(config.seq_len)
    model.train()
    recent: list[float] = []
    step = 0
    begin = time.perf_counter()
    stopped_by = "steps"
    while step < config.max_train_steps:
        elapsed = time.perf_counter() - begin
        if elapsed >= config.max_train_seconds:
            stopped_by = "time"
            break
        progress = max(step / config.max_train_steps, elapsed / config.max_train_seconds)
        warm = min(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps else 1.0
        floor = config.min_lr_fraction
        scale = warm * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))
        for group in optimizer.param_groups:
            group["lr"] = config.lr * scale
        starts = torch.randint(
            0, len(stream) - config.seq_len + 1, (config.train_batch, 1), generator=generator
        )
        window = stream[starts + span]
        logits = model(input_ids=window).logits
        loss = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), window[:, 1:].reshape(-1)
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        recent = [*recent[-49:], float(loss.detach())]
        step += 1
    model.eval()
    return {
        "steps": step,
        "stopped_by": stopped_by,
        "train_tokens_seen": step * config.train_batch * config.seq_len,
        "train_stream_tokens": len(stream),
        "encode_seconds": round(encode_seconds, 3),
        "optimise_seconds": round(time.perf_counter() - begin, 3),
        "final_train_loss": round(sum(recent) / len(recent), 6) if recent else None,
    }


def _windows(
    tokenizer: StdlibTokenizer, files: Sequence[str], *, n: int, seq_len: int, argument: str
) -> torch.Tensor:
    """``n`` non-overlapping windows ``[n, seq_len]`` from the start of the files' stream."""
    stream = token_stream(tokenizer, files, min_tokens=n * seq_len)
    count = take(argument, n, len(stream) // seq_len)
    return stream[: count * seq_len].view(count, seq_len)


def build_stdlib_lm_workload(
    config: StdlibLMConfig,
    *,
    name: str,
    seed: int,
    cache_dir: Path,
    n_calib: int,
    n_test: int | None,
    batch_size: int,
) -> PerplexityWorkload:
    """The stdlib LM workload of ``config``: tokenizer and weights from ``cache_dir`` or trained.

    ``n_calib`` / ``n_test`` count windows of ``config.seq_len`` tokens (``n_test=None``:
    ``N_TEST``); ``info`` records the tokenizer, the parameter count, the training run and
    ``fp32_quality`` / ``fp32_perplexity``.

    >>> wl = build_stdlib_lm_workload(TINY_CONFIG, name="t", seed=0, cache_dir=tmp,
    ...                               n_calib=8, n_test=8, batch_size=4)  # doctest: +SKIP
    """
    if importlib.util.find_spec("transformers") is None or (
        config.tokenizer == "bpe" and importlib.util.find_spec("tokenizers") is None
    ):
        raise ModuleNotFoundError(
            f"The workload {name!r} needs the optional packages 'transformers' and 'tokenizers': "
            "pip install -e '.[models]'."
        )
    tokenizer, tokenizer_info = load_tokenizer(config, name=name, cache_dir=cache_dir)
    train_files = _train_files(config)
    key = fingerprint(name, asdict(config), tokenizer.digest, _digest(train_files))
    model, info = load_or_train(
        name,
        seed=seed,
        cache_dir=cache_dir,
        key=key,
        build=lambda: build_model(config, tokenizer),
        train=lambda m: _train(m, tokenizer, config, seed=seed),
    )
    files = stdlib_files(config.split)
    calib = _windows(
        tokenizer, files["calib"], n=n_calib, seq_len=config.seq_len, argument="n_calib"
    )
    test = _windows(
        tokenizer, files["test"], n=n_test or N_TEST, seq_len=config.seq_len, argument="n_test"
    )
    test_batches = [{"input_ids": chunk.clone()} for chunk in torch.split(test, batch_size)]
    workload = PerplexityWorkload(
        name=name,
        model=model,
        calib=[{"input_ids": chunk.clone()} for chunk in torch.split(calib, batch_size)],
        test=test_batches,
        test_labels=None,
        example_input=test_batches[0],
        task="language_model",
        info={
            **info,
            **tokenizer_info,
            "vocab_size": tokenizer.vocab_size,
            "n_params": sum(p.numel() for p in model.parameters()),
            "files": {split: len(paths) for split, paths in files.items()},
            "train_files_used": len(train_files),
            "config": asdict(config),
        },
    )
    quality = workload.evaluate(model)
    workload.info.update(fp32_quality=quality, fp32_perplexity=math.exp(-quality))
    return workload


def _register(name: str, config: StdlibLMConfig) -> None:
    @register_workload(name)
    def build(
        *, seed: int, cache_dir: Path, n_calib: int, n_test: int | None, batch_size: int
    ) -> Workload:
        return build_stdlib_lm_workload(
            config,
            name=name,
            seed=seed,
            cache_dir=cache_dir,
            n_calib=n_calib,
            n_test=n_test,
            batch_size=batch_size,
        )


_register("stdlib_lm", STDLIB_LM_CONFIG)
_register("stdlib_lm_tiny", TINY_CONFIG)
