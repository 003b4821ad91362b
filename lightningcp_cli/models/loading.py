"""Checkpoint loading with strict key and shape checks.

A weights folder uses the official EchoMimic v1 layout (no key prefixes, diffusers
names), each file as ``.safetensors`` or a pickled ``.pth``/``.pt`` state dict::

    reference_unet.*                 ReferenceNet
    denoising_unet{suffix}.*         VideoUNet, with or without its motion modules
    motion_module{suffix}.*          the motion modules (needed when the file above lacks them)
    face_locator.*                   FaceLocator

Every key of every file must land on a parameter or buffer of the right shape, and
every parameter and buffer must come from some file (the motion modules' sinusoid
``pos_encoder.pe`` buffers may be absent: they are recomputed).  Pickles are read with
``torch.load(weights_only=True)`` only.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import ModelLoadError
from .face_locator import FaceLocator
from .motion import PositionEncoding
from .registry import ModelSpec
from .unet import ReferenceNet, VideoUNet

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt")
_OPTIONAL_KEY_SUFFIX = ".pos_encoder.pe"  # recomputable buffers, may be left out of files
_MOTION_KEY = ".motion_modules."
_SHOW = 5  # keys named per category in a one-line message

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class DenoiserWeights:
    """The three networks of a model, on the requested device and dtype, in eval mode."""

    reference_net: ReferenceNet
    denoiser: VideoUNet
    face_locator: FaceLocator
    random_weights: bool
    files: dict[str, Path] = field(default_factory=dict)  # role -> file that was loaded


class StateDictMismatchError(ModelLoadError):
    """Keys or shapes of a weights file do not match the model.

    ``missing``/``unexpected`` list keys, ``mismatched`` holds ``(key, file_shape,
    model_shape)``; the message names only the first few of each.
    """

    def __init__(
        self,
        message: str,
        missing: list[str],
        unexpected: list[str],
        mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]],
    ) -> None:
        super().__init__(message)
        self.missing = missing
        self.unexpected = unexpected
        self.mismatched = mismatched


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")


def load_state_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or ``.pth``/``.pt`` (weights-only pickle).

    A ``{"state_dict": {...}}`` wrapper is unwrapped.  Raises :class:`ModelLoadError`.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path}: weights file does not exist")
    suffix = path.suffix.lower()
    if suffix not in WEIGHT_SUFFIXES:
        raise ModelLoadError(f"{path}: unsupported weights format (use .safetensors, .pth or .pt)")
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path), device="cpu")
        else:
            try:  # memory-mapped: a 3 GB file is not read into RAM twice
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception:  # old (non-zip) pickles cannot be mapped
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelLoadError(f"{path}: cannot read weights ({_first_line(e)})") from e
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise ModelLoadError(f"{path}: not a state dict (expected a mapping of names to tensors)")
    return dict(obj)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _names(items: list[str]) -> str:
    more = f", … +{len(items) - _SHOW}" if len(items) > _SHOW else ""
    return ", ".join(items[:_SHOW]) + more


def load_strict(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    file_label: str,
    *,
    keys: Iterable[str] | None = None,
    assign: bool = False,
) -> None:
    """Load ``state_dict`` into ``module`` after checking it key by key.

    ``keys`` restricts the check to the part of the module this file is for (default:
    the whole state dict): each of them must be present (``*.pos_encoder.pe`` may be
    absent), no other key may appear, and shapes must match.  Raises
    :class:`StateDictMismatchError` with a one-line summary naming ``file_label``.
    ``assign=True`` adopts the file's tensors (for models built on the meta device).
    """
    expected = module.state_dict(keep_vars=True)
    wanted = list(expected) if keys is None else [k for k in keys if k in expected]
    wanted_set = set(wanted)
    missing = [k for k in wanted if k not in state_dict and not k.endswith(_OPTIONAL_KEY_SUFFIX)]
    unexpected = [k for k in state_dict if k not in wanted_set]
    mismatched = [
        (k, tuple(v.shape), tuple(expected[k].shape))
        for k, v in state_dict.items()
        if k in wanted_set and tuple(v.shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{_plural(len(missing), 'missing key')} ({_names(missing)})")
        if unexpected:
            parts.append(f"{_plural(len(unexpected), 'unexpected key')} ({_names(unexpected)})")
        if mismatched:
            shown = [f"{k}: file {list(a)} vs model {list(b)}" for k, a, b in mismatched]
            word = "shape mismatch" if len(mismatched) == 1 else "shape mismatches"
            parts.append(f"{len(mismatched)} {word} ({_names(shown)})")
        raise StateDictMismatchError(
            f"{file_label}: weights do not match the model: {'; '.join(parts)}",
            missing,
            unexpected,
            mismatched,
        )
    module.load_state_dict(dict(state_dict), strict=False, assign=assign)


def _find(folder: Path, stem: str) -> Path | None:
    for suffix in WEIGHT_SUFFIXES:
        path = folder / f"{stem}{suffix}"
        if path.is_file():
            return path
    return None


def _finish(module: nn.Module, label: str, device, dtype) -> nn.Module:
    """Recompute position tables the files left out, check coverage, move, eval."""
    for m in module.modules():
        if isinstance(m, PositionEncoding) and m.pe.is_meta:
            m.reset(device="cpu", dtype=torch.float32)
    left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:
        raise ModelLoadError(
            f"{label}: {_plural(len(left), 'tensor')} came from no weights file ({_names(left)})"
        )
    return module.to(device=device, dtype=dtype).eval()


def load_model_weights(
    spec: ModelSpec,
    folder: str | Path | None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str = torch.float32,
    *,
    seed: int | None = 0,
) -> DenoiserWeights:
    """Build ReferenceNet, VideoUNet and FaceLocator for ``spec``.

    ``folder`` None: random initialisation (PyTorch defaults, seeded with ``seed``; None
    = the global RNG) and ``random_weights=True``.  Otherwise the models are built on
    the meta device and take their tensors from the folder's files (official layout,
    see the module docstring); anything missing, extra or misshapen raises
    :class:`ModelLoadError`.
    """
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ModelLoadError(f"unknown dtype {dtype!r}")
        dtype = _DTYPES[dtype]
    device = torch.device(device)
    bank_dtype = spec.torch_bank_dtype

    if folder is None:
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            reference = ReferenceNet(spec.unet, bank_dtype=bank_dtype)
            denoiser = VideoUNet(spec.unet)
            locator = FaceLocator(spec.face_locator)
        return DenoiserWeights(
            reference.to(device=device, dtype=dtype).eval(),
            denoiser.to(device=device, dtype=dtype).eval(),
            locator.to(device=device, dtype=dtype).eval(),
            random_weights=True,
        )

    folder = Path(folder)
    if not folder.is_dir():
        raise ModelLoadError(f"{folder}: weights folder does not exist")
    suffix = spec.weight_suffix
    stems = {
        "reference_unet": "reference_unet",
        "denoising_unet": f"denoising_unet{suffix}",
        "motion_module": f"motion_module{suffix}",
        "face_locator": "face_locator",
    }
    files = {role: _find(folder, stem) for role, stem in stems.items()}
    required = ("reference_unet", "denoising_unet", "face_locator")
    absent = [f"{stems[role]}.pth" for role in required if files[role] is None]
    if absent:
        raise ModelLoadError(
            f"{folder}: missing {', '.join(absent)} (or .safetensors) for model {spec.name}"
        )

    with torch.device("meta"):
        reference = ReferenceNet(spec.unet, bank_dtype=bank_dtype)
        denoiser = VideoUNet(spec.unet)
        locator = FaceLocator(spec.face_locator)

    load_strict(
        reference,
        load_state_file(files["reference_unet"]),
        files["reference_unet"].name,
        assign=True,
    )

    all_keys = list(denoiser.state_dict(keep_vars=True))
    motion_keys = [k for k in all_keys if _MOTION_KEY in k]
    main_sd = load_state_file(files["denoising_unet"])
    has_motion = any(_MOTION_KEY in k for k in main_sd)
    main_keys = all_keys if has_motion else [k for k in all_keys if _MOTION_KEY not in k]
    load_strict(denoiser, main_sd, files["denoising_unet"].name, keys=main_keys, assign=True)
    del main_sd
    if files["motion_module"] is not None:
        load_strict(
            denoiser,
            load_state_file(files["motion_module"]),
            files["motion_module"].name,
            keys=motion_keys,
            assign=True,
        )
    elif not has_motion:
        raise ModelLoadError(
            f"{folder}: missing {stems['motion_module']}.pth and "
            f"{files['denoising_unet'].name} has no motion modules"
        )
    else:
        files.pop("motion_module")

    load_strict(
        locator, load_state_file(files["face_locator"]), files["face_locator"].name, assign=True
    )
    return DenoiserWeights(
        _finish(reference, files["reference_unet"].name, device, dtype),
        _finish(denoiser, files["denoising_unet"].name, device, dtype),
        _finish(locator, files["face_locator"].name, device, dtype),
        random_weights=False,
        files={role: path for role, path in files.items() if path is not None},
    )
