"""One loaded talking-head model: the networks plus the codec and audio encoder they need.

``load_model("lcp-tiny")`` takes the bundled weights; ``load_model("echomimic-v1",
weights=DIR)`` an official EchoMimic folder.  Without weights a model is built with
random weights (seeded) and a :class:`RandomWeightsWarning` is raised: its compute is
the real one (speed benchmarks are valid), its output is noise.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError, DeviceError, ModelLoadError
from .audio_encoder import AudioEncoder, MelAudioEncoder
from .codec import LatentCodec, load_codec
from .face_locator import FaceLocator
from .loading import load_model_weights
from .offload import ModelOffload
from .registry import ModelSpec, get_model_spec
from .unet import ReferenceNet, VideoUNet

BUNDLED_WEIGHTS = Path(__file__).resolve().parent.parent / "weights"

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class RandomWeightsWarning(UserWarning):
    """The model runs with random weights: timings are real, the video is noise."""


@dataclass
class TalkingHeadModel:
    spec: ModelSpec
    reference_net: ReferenceNet
    denoiser: VideoUNet
    face_locator: FaceLocator
    codec: LatentCodec
    audio_encoder: AudioEncoder
    device: torch.device
    dtype: torch.dtype
    random_weights: bool
    weights_id: str  # identifies the weights for cache keys ("random:<seed>" or a digest)
    offload: ModelOffload | None = None  # set: networks wait in CPU memory (--offload)


def resolve_device(device: str, dtype: str | None) -> tuple[torch.device, torch.dtype]:
    """``cpu``/``cuda``/``cuda:N``/``mps``/``auto``; dtype None = fp32 on CPU, fp16 on GPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ConfigError(f"--device {device}: not a device ({e})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"--device {device}: CUDA is not available on this machine")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"--device {device}: MPS is not available on this machine")
    if dtype is None:
        return dev, torch.float32 if dev.type == "cpu" else torch.float16
    if dtype not in _DTYPES:
        raise ConfigError(f"--dtype {dtype}: choose float32, float16 or bfloat16")
    if dev.type == "cpu" and dtype == "float16":
        raise DeviceError("--dtype float16 is not supported on CPU (use float32 or bfloat16)")
    return dev, _DTYPES[dtype]


def _weights_digest(folder: Path) -> str:
    """Cheap identity of a weights folder: names, sizes and mtimes of its files."""
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.relative_to(folder)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def bundled_weights_dir(spec: ModelSpec) -> Path | None:
    folder = BUNDLED_WEIGHTS / spec.name
    return folder if (folder / "denoising_unet.safetensors").is_file() else None


WHISPER_STEM = "audio_processor/whisper_tiny"  # + .pt or .safetensors, in the weights folder


def _audio_encoder(
    spec: ModelSpec,
    folder: Path | None,
    device: torch.device = torch.device("cpu"),
    dtype: torch.dtype = torch.float32,
) -> AudioEncoder:
    """The spec's audio encoder.  whisper-tiny runs in float32 on CPU and, like EchoMimic's
    ``transcribe`` default, in float16 on a GPU unless float32 is asked for."""
    if spec.audio_encoder == "mel":
        return MelAudioEncoder(spec.unet.cross_attention_dim, spec.audio_window_position)
    if spec.audio_encoder == "whisper-tiny":
        from .whisper import load_whisper_encoder

        if folder is None:
            raise ModelLoadError(
                f"{spec.name}: whisper-tiny audio encoder needs a weights folder "
                f"({WHISPER_STEM}.pt); pass --weights DIR"
            )
        candidates = [folder / f"{WHISPER_STEM}{s}" for s in (".pt", ".safetensors")]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise ModelLoadError(
                f"{candidates[0]}: whisper-tiny audio encoder not found "
                f"(expected {WHISPER_STEM}.pt or .safetensors in {folder})"
            )
        fp32 = device.type == "cpu" or dtype == torch.float32
        encoder = load_whisper_encoder(path, device, torch.float32 if fp32 else torch.float16)
        if encoder.dim != spec.unet.cross_attention_dim:
            raise ModelLoadError(
                f"{path}: whisper encoder is {encoder.dim} wide, model {spec.name} takes "
                f"{spec.unet.cross_attention_dim}-wide audio tokens"
            )
        return encoder
    raise ModelLoadError(
        f"{spec.name}: audio encoder {spec.audio_encoder!r} is not available in this version"
    )


def load_model(
    model: str | ModelSpec,
    weights: Path | None = None,
    device: str = "cpu",
    dtype: str | None = None,
    *,
    seed: int = 0,
    offload: bool = False,
) -> TalkingHeadModel:
    """Load ``model`` (a name or spec) with ``weights`` (None: the bundled ones, else
    random) on ``device``.  ``offload`` keeps the networks in CPU memory and moves each to
    ``device`` only while it runs (:mod:`.offload`); on a CPU device it changes nothing."""
    spec = get_model_spec(model) if isinstance(model, str) else model
    dev, torch_dtype = resolve_device(device, dtype)
    home = torch.device("cpu") if offload else dev  # where the weights are loaded to
    if weights is not None:
        weights = Path(weights)
        if not weights.exists():
            raise ModelLoadError(f"{weights}: weights folder does not exist")
        if not weights.is_dir():
            raise ModelLoadError(f"{weights}: expected a folder of weight files")
    folder = weights or bundled_weights_dir(spec)
    audio_encoder = _audio_encoder(spec, folder, dev, torch_dtype)  # small: fail early
    torch.manual_seed(seed)  # random init (no weights) is reproducible
    nets = load_model_weights(spec, folder, home, torch_dtype)
    if nets.random_weights:
        warnings.warn(
            f"{spec.name}: no weights found, running with RANDOM weights "
            "(timings are real, the video is noise); pass --weights DIR",
            RandomWeightsWarning,
            stacklevel=2,
        )
    codec = load_codec(spec.codec, spec.codec_factor, folder, home, torch_dtype)
    offloader = None
    if offload:
        networks: dict[str, nn.Module] = {}
        whisper = getattr(audio_encoder, "model", None)
        if isinstance(whisper, nn.Module):
            networks["audio_encoder"] = whisper
        networks.update(
            reference_net=nets.reference_net,
            face_locator=nets.face_locator,
            denoiser=nets.denoiser,
        )
        vae = getattr(codec, "vae", None)
        if isinstance(vae, nn.Module):
            networks["vae"] = vae
        offloader = ModelOffload(networks, dev)
    return TalkingHeadModel(
        spec=spec,
        reference_net=nets.reference_net.eval(),
        denoiser=nets.denoiser.eval(),
        face_locator=nets.face_locator.eval(),
        codec=codec,
        audio_encoder=audio_encoder,
        device=dev,
        dtype=torch_dtype,
        random_weights=nets.random_weights,
        weights_id=f"random:{seed}" if folder is None else _weights_digest(folder),
        offload=offloader,
    )
