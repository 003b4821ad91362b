"""``lcp convert``: write a ``.safetensors`` copy of each pickled weight file of a folder.

EchoMimic ships pickles (``.pth``/``.pt``); safetensors load without unpickling, can be
memory-mapped and are preferred by the loader when both exist (:mod:`.loading`).  The
tensors are copied as they are (names, shapes, dtypes); whisper's ``{"dims",
"model_state_dict"}`` checkpoint keeps its dims as JSON metadata.  Each copy is written
to a temporary file, read back and compared tensor by tensor, then renamed into place.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import ModelLoadError, OutputExistsError
from .loading import load_state_file
from .whisper import read_whisper_checkpoint

#: Weight files of the official layout (stems, relative to the folder).
OFFICIAL_STEMS = (
    "reference_unet",
    "denoising_unet",
    "motion_module",
    "face_locator",
    "denoising_unet_acc",
    "motion_module_acc",
    "audio_processor/whisper_tiny",
)
_PICKLES = (".pth", ".pt")


def pickled_weights(folder: Path) -> list[Path]:
    """The official pickled weight files present in ``folder``."""
    found = []
    for stem in OFFICIAL_STEMS:
        for suffix in _PICKLES:
            path = folder / f"{stem}{suffix}"
            if path.is_file():
                found.append(path)
                break
    return found


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if path.parent.name == "audio_processor":
        state, dims = read_whisper_checkpoint(path)
        return state, ({"dims": json.dumps(dims)} if dims is not None else {})
    return load_state_file(path), {}


def convert_file(path: Path, target: Path, *, overwrite: bool = False) -> Path:
    """Write ``target`` (.safetensors) with the tensors of the pickle ``path``."""
    if target.exists() and not overwrite:
        raise OutputExistsError(f"{target}: already exists (use --overwrite)")
    state, metadata = _read(path)
    # safetensors wants contiguous tensors that share no storage.
    tensors = {k: v.detach().contiguous().clone() for k, v in state.items()}
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.lcp-tmp")
    try:
        save_file(tensors, str(tmp), metadata={"format": "pt", **metadata})
        back = load_file(str(tmp))
        if back.keys() != tensors.keys() or not all(
            back[k].dtype == v.dtype and torch.equal(back[k], v) for k, v in tensors.items()
        ):
            raise ModelLoadError(f"{target}: the written copy differs from {path}")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def convert_folder(
    folder: Path,
    out: Path | None = None,
    *,
    overwrite: bool = False,
    on_file: Callable[[Path, Path], None] | None = None,
) -> list[Path]:
    """Convert every official pickle of ``folder`` into ``out`` (default: beside it),
    keeping the relative paths.  Raises :class:`ModelLoadError` when there is none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelLoadError(f"{folder}: weights folder does not exist")
    sources = pickled_weights(folder)
    if not sources:
        names = ", ".join(f"{s}.pth" for s in OFFICIAL_STEMS[:4])
        raise ModelLoadError(f"{folder}: no pickled weights to convert (expected {names}, ...)")
    out = Path(out) if out is not None else folder
    written = []
    for path in sources:
        target = (out / path.relative_to(folder)).with_suffix(".safetensors")
        written.append(convert_file(path, target, overwrite=overwrite))
        if on_file:
            on_file(path, target)
    return written
