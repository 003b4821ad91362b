"""Named model specs: architecture, codec, audio front end and sampler defaults.

``echomimic-v1`` is the official EchoMimic v1 at full size (its published weights load
into it), ``echomimic-v1-acc`` the same network with the distilled 6-step weights, and
``lcp-tiny`` the same architecture code at a size that trains and runs on a laptop CPU
(weight-free DCT codec and mel audio tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError
from .codec import YCBCR_LUMA_CHANNELS
from .face_locator import FaceLocatorConfig
from .unet import UNetConfig

AUDIO_ENCODERS = ("mel", "whisper-tiny")
CODECS = ("pixel", "dct", "dct-ycbcr", "sd-vae")
LATENT_ORIGINS = ("zero", "reference")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
_BANK_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class ModelSpec:
    """One named model.  Validated on creation (``ValueError``).

    ``resolution`` is the face-crop side in pixels; the latent grid is
    ``resolution // codec_factor``.  ``bank_dtype`` is the storage dtype of the reference
    bank (EchoMimic rounds it to float16 even in float32 runs; None = model dtype).
    ``weight_suffix`` names the denoiser files of a variant folder
    (``denoising_unet{suffix}.pth``, ``motion_module{suffix}.pth``).
    ``latent_origin`` is what the denoiser's latents are measured from: ``"zero"`` (the
    codec's latents, as in EchoMimic) or ``"reference"`` (latents minus the encoded
    reference crop, so a still face is all zeros and the network only has to generate
    what moves; decode adds the reference back).  ``prediction_type`` is what the
    denoiser outputs (diffusers' names): EchoMimic predicts v, lcp-tiny the clean latent.
    ``audio_window_position`` is the amplitude of the offset code added to each row of a
    frame's audio window (:func:`~lightningcp_cli.stages.audio.window_position_code`; 0:
    none, as EchoMimic, whose whisper rows carry their time themselves).
    ``epsilon_scaling`` is the sampler's default exposure-bias correction
    (:class:`~lightningcp_cli.stages.denoise.EpsilonScaledDDIMScheduler`; 0: plain DDIM).
    ``mouth_track``: the face locator also reads each frame's mouth opening, drawn into
    the mouth box of its mask from the speech (:mod:`~lightningcp_cli.stages.motion`);
    False: the face box alone, one mask for the video (EchoMimic's audio-driven mode).
    ``locator_reference``: the face locator also reads the reference crop's pixels (3 more
    input channels, aligned with the frames), needs ``mouth_track``.
    ``change_blur``: sigma (pixels) of the Gaussian blur applied at decode to each frame's
    change from the reference (:func:`~lightningcp_cli.stages.decode.decode_frames`); 0:
    none.  Needs latents relative to the reference and a linear codec (DCT or pixel),
    where a frame decodes as the reference's image plus its change's.
    ``chroma_guidance``: the classifier-free guidance scale of the latent's colour
    channels (``dct-ycbcr`` codec only); None: ``guidance`` for every channel.
    """

    name: str
    description: str
    unet: UNetConfig
    face_locator: FaceLocatorConfig
    audio_encoder: str  # "mel" | "whisper-tiny"
    codec: str  # "pixel" | "sd-vae"
    codec_factor: int
    latent_channels: int
    resolution: int
    fps: int
    steps: int
    guidance: float
    context_frames: int = 12
    context_overlap: int = 3
    bank_dtype: str | None = None
    weight_suffix: str = ""
    latent_origin: str = "zero"
    prediction_type: str = "v_prediction"
    audio_window_position: float = 0.0
    epsilon_scaling: float = 0.0
    mouth_track: bool = False
    locator_reference: bool = False
    change_blur: float = 0.0
    chroma_guidance: float | None = None

    @property
    def chroma_channel(self) -> int | None:
        """First latent channel that carries colour (the YCbCr DCT codec: luma first, then
        Cb and Cr), or None when the latent has no colour channels of its own."""
        return YCBCR_LUMA_CHANNELS if self.codec == "dct-ycbcr" else None

    def __post_init__(self) -> None:
        u, fl = self.unet, self.face_locator
        if not self.name:
            raise ValueError("model spec needs a name")
        if self.audio_encoder not in AUDIO_ENCODERS:
            raise ValueError(f"{self.name}: audio_encoder must be one of {AUDIO_ENCODERS}")
        if self.codec not in CODECS:
            raise ValueError(f"{self.name}: codec must be one of {CODECS}")
        if self.latent_origin not in LATENT_ORIGINS:
            raise ValueError(f"{self.name}: latent_origin must be one of {LATENT_ORIGINS}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"{self.name}: prediction_type must be one of {PREDICTION_TYPES}")
        if self.codec_factor < 1:
            raise ValueError(f"{self.name}: codec_factor must be >= 1")
        if self.codec == "pixel" and self.latent_channels != 3 * self.codec_factor**2:
            raise ValueError(
                f"{self.name}: the pixel codec at factor {self.codec_factor} gives "
                f"{3 * self.codec_factor**2} latent channels, not {self.latent_channels}"
            )
        if not (u.in_channels == u.out_channels == self.latent_channels):
            raise ValueError(
                f"{self.name}: UNet in/out channels ({u.in_channels}/{u.out_channels}) must "
                f"equal latent_channels ({self.latent_channels})"
            )
        if fl.out_channels != u.block_out_channels[0]:
            raise ValueError(
                f"{self.name}: face locator gives {fl.out_channels} channels, the UNet's "
                f"conv_in {u.block_out_channels[0]}"
            )
        if self.locator_reference and not self.mouth_track:
            raise ValueError(f"{self.name}: locator_reference needs mouth_track")
        if fl.conditioning_channels != 1 + 3 * self.locator_reference:
            raise ValueError(
                f"{self.name}: the face locator reads {fl.conditioning_channels} channels, "
                f"the spec gives it {1 + 3 * self.locator_reference}"
            )
        if fl.downsample_factor != self.codec_factor:
            raise ValueError(
                f"{self.name}: face locator downsamples by {fl.downsample_factor}, "
                f"the codec by {self.codec_factor}"
            )
        if self.audio_encoder != "mel" and self.audio_window_position:
            raise ValueError(f"{self.name}: audio_window_position needs the mel encoder")
        if self.audio_encoder == "whisper-tiny" and u.cross_attention_dim != 384:
            raise ValueError(f"{self.name}: whisper-tiny tokens are 384 wide")
        step = self.codec_factor * u.downsample_factor
        if self.resolution <= 0 or self.resolution % step:
            raise ValueError(f"{self.name}: resolution must be a positive multiple of {step}")
        if self.fps < 1 or self.steps < 1 or self.guidance < 0:
            raise ValueError(f"{self.name}: fps and steps must be >= 1, guidance >= 0")
        if not 1 <= self.context_frames <= u.motion_max_len:
            raise ValueError(f"{self.name}: context_frames must be in [1, {u.motion_max_len}]")
        if not 0 <= self.context_overlap < self.context_frames:
            raise ValueError(f"{self.name}: context_overlap must be in [0, context_frames)")
        if not 0 <= self.epsilon_scaling <= 1:
            raise ValueError(f"{self.name}: epsilon_scaling must be in [0, 1]")
        if self.chroma_guidance is not None and (
            self.chroma_channel is None or self.chroma_guidance < 0
        ):
            raise ValueError(f"{self.name}: chroma_guidance needs the dct-ycbcr codec, >= 0")
        if self.change_blur < 0:
            raise ValueError(f"{self.name}: change_blur must be >= 0")
        if self.change_blur and (self.latent_origin != "reference" or self.codec == "sd-vae"):
            raise ValueError(
                f"{self.name}: change_blur needs latents relative to the reference and a "
                "linear codec (not sd-vae)"
            )
        if self.bank_dtype is not None and self.bank_dtype not in _BANK_DTYPES:
            raise ValueError(f"{self.name}: bank_dtype must be None or one of {list(_BANK_DTYPES)}")

    @property
    def latent_size(self) -> int:
        return self.resolution // self.codec_factor

    @property
    def torch_bank_dtype(self) -> torch.dtype | None:
        return None if self.bank_dtype is None else _BANK_DTYPES[self.bank_dtype]


_ECHOMIMIC = dict(
    unet=UNetConfig(),  # defaults are EchoMimic v1's
    face_locator=FaceLocatorConfig(),
    audio_encoder="whisper-tiny",
    codec="sd-vae",
    codec_factor=8,
    latent_channels=4,
    resolution=512,
    fps=24,
    bank_dtype="float16",
)

MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="echomimic-v1",
            description="EchoMimic v1 (audio-driven), official weights, 512 px, 30 DDIM steps",
            steps=30,
            guidance=2.5,
            **_ECHOMIMIC,
        ),
        ModelSpec(
            name="echomimic-v1-acc",
            description="EchoMimic v1, distilled 'acc' weights: 6 steps, no CFG",
            steps=6,
            guidance=1.0,
            weight_suffix="_acc",
            **_ECHOMIMIC,
        ),
        ModelSpec(
            name="lcp-tiny",
            description="EchoMimic-v1 architecture at laptop size: 128 px, DCT codec, mel audio",
            # Sized to train in < 90 min on a 2-core CPU: an 8x8 DCT "latent" (YCbCr: 24
            # luma + 2 x 4 chroma frequencies = 32 channels on a 16x16 grid) keeps
            # attention cheap; one head per layer because CPU attention kernels are ~3x
            # faster at head width 64 than at 8-16 (measured).  Latents relative to the
            # reference crop and a clean-latent (x0) prediction: a still face is exactly
            # 0, which the network learns in a few hundred steps (25 dB on held-out clips
            # after 250 CPU steps, where v-prediction of absolute latents was at 15 dB).
            # The offset code on the audio windows lets cross-attention tell a frame's
            # own instant from its neighbours (lip sync: README model card).
            unet=UNetConfig(
                in_channels=32,
                out_channels=32,
                block_out_channels=(32, 64, 64, 64),
                layers_per_block=1,
                attention_heads=1,
                norm_num_groups=16,
                cross_attention_dim=80,
                motion_heads=4,
                motion_norm_groups=16,
            ),
            face_locator=FaceLocatorConfig(
                out_channels=32, conditioning_channels=4, block_out_channels=(16, 32, 32, 32)
            ),
            audio_encoder="mel",
            codec="dct-ycbcr",
            codec_factor=8,
            latent_channels=32,
            resolution=128,
            fps=24,
            steps=25,
            guidance=2.0,
            bank_dtype=None,
            latent_origin="reference",
            prediction_type="sample",
            audio_window_position=0.5,
            # Its x0 predictions drift when fed its own latents (on 8 held-out clips lip
            # sync fell from 0.31 at 4 steps to 0.17 at 25).  Shrinking DDIM's noise
            # direction by up to 10 % lowers flicker by a third and raises drift PSNR on
            # all 6 portraits measured; lip sync moves either way (README model card).
            epsilon_scaling=0.1,
            # Without it the network ignored the audio at zero SNR, so the first steps'
            # noise decided the mouth's motion (README model card, "Where the audio acts").
            mouth_track=True,
            # Its errors come as 8x8 DCT blocks (patches on cheeks and chin, banding where
            # the jaw moves); blurring each frame's change from the reference softens them
            # and keeps the reference's detail.  Sigma 0 / 0.8 / 1.2 on 5 portrait + speech
            # pairs not used to pick it: lip sync 0.60 / 0.66 / 0.57, flicker -16 % at 0.8,
            # drift PSNR up on all; at 2 the mouth blurs away on real portraits (README).
            change_blur=0.8,
            # Face mesh finds the open mouth by its colour as much as by its brightness, and
            # the opening's colour change is what guidance 2 leaves too faint on new faces.
            # Chroma guidance 1 / 2 / 3 (luma 2) on 10 held-out clips: lip sync 0.44 / 0.55
            # / 0.64; on 32 clips and 10 portrait pairs not used to pick it, 2 -> 3 took
            # held-out lip sync 0.59 -> 0.63 and raised it on all 10 pairs (README).
            chroma_guidance=3.0,
            # At zero SNR the noisy input shows nothing of the face, and reference
            # attention has no notion of position: the crop's own pixels are the only
            # aligned view of the mouth to open.  Trained together with open references
            # (SynthesisConfig.p_open_reference); alone it did not lift the zero-SNR probe
            # on new faces (README model card, "Where the audio acts").
            locator_reference=True,
        ),
    )
}


def get_model_spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise ConfigError(
            f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}"
        ) from None
