"""The mouth track: the speech's mouth opening per frame, drawn into the face locator's mask."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightningcp_cli.config import AudioConfig, DenoiseConfig
from lightningcp_cli.models.face_locator import FaceLocator, FaceLocatorConfig
from lightningcp_cli.stages.audio import load_audio, prepare_audio
from lightningcp_cli.stages.denoise import denoise, denoise_stream
from lightningcp_cli.stages.motion import (
    MAX_OPEN,
    MESH_POINTS,
    SAMPLE_RATE,
    LocatorTrack,
    frame_curve,
    locator_masks,
    mouth_gap,
    mouth_geometry,
    mouth_opening,
)
from lightningcp_cli.train.speech import frame_envelope

from .cli_util import SPEECH
from .test_denoise import LinearDenoiser


def test_mouth_track_follows_the_speech_envelope_and_is_closed_in_silence():
    speech = load_audio(SPEECH, SAMPLE_RATE).samples
    fps = 24
    n = int(len(speech) / SAMPLE_RATE * fps)
    track = mouth_opening(speech, SAMPLE_RATE, fps, n)
    assert track.shape == (n,) and track.dtype == np.float32
    assert track.min() >= 0 and track.max() <= 1 and track.max() > 0.5
    envelope = frame_envelope(speech, fps)[:n]
    assert np.corrcoef(track, envelope)[0, 1] > 0.7
    silent = mouth_opening(np.zeros(SAMPLE_RATE, np.float32), SAMPLE_RATE, fps, fps)
    assert not silent.any()
    with pytest.raises(ValueError, match="16000 Hz"):
        mouth_opening(speech, 44_100, fps, n)


def test_frame_curve_samples_the_50hz_curve_at_frame_times():
    curve = np.arange(10, dtype=np.float32)  # value = 50 Hz frame index
    assert frame_curve(curve, 25, 0, 4).tolist() == [0, 2, 4, 6]  # 2 curve frames per frame
    assert frame_curve(curve, 25, 3, 3).tolist() == [6, 8, 0]  # 0 past the end
    assert frame_curve(curve, 100, 1, 2).tolist() == [0.5, 1.0]  # interpolated


def test_mouth_gap_opens_between_the_lip_corners_as_the_animator_does():
    geometry = torch.tensor([[20.0, 30.0, 40.0, 30.0, 50.0]])  # corners, face height 50
    gap = mouth_gap(geometry, torch.tensor([[0.0, 0.5, 1.0]]), 64)
    assert gap.shape == (1, 3, 64, 64) and gap.min() >= 0 and gap.max() <= 1
    assert gap[0, 0].sum() == 0  # closed
    column = gap[0, :, :, 30]  # the centre column: MAX_OPEN * 50 * opening pixels tall
    assert torch.allclose(column.sum(-1), torch.tensor([0, 0.5, 1.0]) * MAX_OPEN * 50, atol=0.01)
    assert gap[0, 2, :, 10].sum() == 0 and gap[0, 2, :, 50].sum() == 0  # not past the corners
    rows = torch.nonzero(column[2] > 0.5).flatten()
    up, down = 30 - rows.min().item(), rows.max().item() + 1 - 30  # the upper lip moves less
    assert up < down


def test_mouth_geometry_reads_the_inner_lip_corners_of_the_mesh():
    landmarks = np.zeros((478, 2), np.float32)
    landmarks[MESH_POINTS["corner_left"]] = (10, 40)
    landmarks[MESH_POINTS["corner_right"]] = (30, 42)
    landmarks[MESH_POINTS["forehead"]] = (20, 0)
    landmarks[MESH_POINTS["chin"]] = (20, 60)
    assert mouth_geometry(landmarks).tolist() == [10, 40, 30, 42, 60]


def test_locator_masks_mark_the_face_the_mouth_and_the_gap_per_frame():
    face = torch.zeros(1, 1, 8, 8)
    face[..., 1:7, 1:7] = 1
    mouth = torch.zeros(1, 1, 8, 8)
    mouth[..., 4:6, 2:6] = 1
    gap = torch.zeros(1, 3, 8, 8)
    gap[0, 1, 5, 3] = 0.5
    gap[0, 2, 5, 3] = 1.0
    masks = locator_masks(face, mouth, gap)
    assert masks.shape == (1, 1, 3, 8, 8)
    assert masks[0, 0, :, 5, 3].tolist() == [2.0, 2.5, 3.0]  # closed mouth still marked
    assert masks[0, 0, :, 2, 2].tolist() == [1.0, 1.0, 1.0]  # face outside the mouth
    assert masks[0, 0, :, 0, 0].tolist() == [0.0, 0.0, 0.0]  # background


def test_locator_track_gives_the_features_of_any_frame_range():
    torch.manual_seed(0)
    locator = FaceLocator(FaceLocatorConfig(out_channels=4, block_out_channels=(4, 4)))
    face, mouth = torch.ones(1, 1, 16, 16), torch.zeros(1, 1, 16, 16)
    mouth[..., 8:12, 4:12] = 1
    geometry = torch.tensor([[5.0, 9.0, 11.0, 9.0, 30.0]])
    opening = torch.linspace(0, 1, 7)
    track = LocatorTrack(locator, face, mouth, geometry, opening)
    with torch.no_grad():
        gap = mouth_gap(geometry, opening[None], 16)
        whole = locator(locator_masks(face, mouth, gap))
        assert len(track) == 7 and whole.shape == (1, 4, 7, 8, 8)
        assert torch.allclose(track[2:5], whole[:, :, 2:5], atol=1e-6)
        assert not torch.allclose(track[2:3], track[5:6])  # the opening changes the feature
    with pytest.raises(TypeError):
        track[::2]


def test_locator_masks_add_the_reference_crop_to_every_frame():
    torch.manual_seed(0)
    face, mouth = torch.ones(2, 1, 8, 8), torch.zeros(2, 1, 8, 8)
    gap, reference = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8) * 2 - 1
    masks = locator_masks(face, mouth, gap, reference)
    assert masks.shape == (2, 4, 3, 8, 8)
    assert torch.equal(masks[:, :1], locator_masks(face, mouth, gap))
    for frame in range(3):
        assert torch.equal(masks[:, 1:, frame], reference)


def test_the_bundled_locator_reads_the_face_crop():
    from lightningcp_cli.api import face_feature
    from lightningcp_cli.models.bundle import load_model
    from lightningcp_cli.stages.motion import MouthTrack

    model = load_model("lcp-tiny")
    assert model.spec.locator_reference
    res = model.spec.resolution
    face_mask = np.zeros((res, res), np.float32)
    face_mask[16:112, 24:104] = 1
    mouth_mask = np.zeros_like(face_mask)
    mouth_mask[80:96, 44:84] = 1
    track = MouthTrack(mouth_mask, np.array([48, 88, 80, 88, 90], np.float32), np.ones(4))
    with pytest.raises(ValueError, match="reads the face crop"):
        face_feature(model, face_mask, track)
    rng = np.random.default_rng(0)
    crop, other_crop = (rng.integers(0, 256, (res, res, 3), dtype=np.uint8) for _ in range(2))

    def feature(c: np.ndarray) -> torch.Tensor:
        with torch.inference_mode():
            return face_feature(model, face_mask, track, c)[0:4]

    assert torch.equal(feature(crop), feature(crop))
    assert not torch.allclose(feature(crop), feature(other_crop))


class FrameCheckingDenoiser(LinearDenoiser):
    """Checks that each call's face feature holds the same frames as its audio."""

    def forward(self, sample, timestep, audio, face_feature=None, bank=None, ref_rows=None):
        frames_of_audio = audio[-1, :, 0, 0]  # the conditional row; token value = frame
        frames_of_face = face_feature[-1, 0, :, 0, 0]
        assert torch.equal(frames_of_face, frames_of_audio), (frames_of_face, frames_of_audio)
        return super().forward(sample, timestep, audio, face_feature, bank, ref_rows)


@pytest.mark.parametrize("chunked", [False, True])
def test_denoise_hands_each_window_the_face_feature_of_its_own_frames(chunked):
    frames = 30
    index = torch.arange(frames, dtype=torch.float32)
    audio = index.view(frames, 1, 1).expand(frames, 6, 5).contiguous()
    face = index.view(1, 1, frames, 1, 1).expand(1, 3, frames, 4, 6).contiguous()
    cfg = DenoiseConfig(
        steps=3,
        guidance=2.5,
        context_frames=12,
        context_overlap=3,
        chunk_frames=16,
        chunk_overlap=4,
    )
    model = FrameCheckingDenoiser()
    if chunked:
        out = torch.cat(list(denoise_stream(model, audio, face, None, cfg, (4, 4, 6))), 2)
    else:
        out = denoise(model, audio, face, None, cfg, (4, 4, 6))
    assert out.shape == (1, 4, frames, 4, 6) and len(model.calls) > 3
    with pytest.raises(ValueError, match="face feature has 7 frames"):
        denoise(model, audio, face[:, :, :7], None, cfg, (4, 4, 6))


def test_audio_features_make_the_mouth_track_of_their_frames():
    from lightningcp_cli.models.audio_encoder import MelAudioEncoder

    features = prepare_audio(SPEECH, MelAudioEncoder(), 24, AudioConfig())
    track = features.mouth_opening()
    speech = load_audio(SPEECH, SAMPLE_RATE).samples
    assert np.array_equal(track, mouth_opening(speech, SAMPLE_RATE, 24, features.num_frames))


def test_the_face_stage_places_the_mouth_geometry_on_the_portraits_lips():
    from lightningcp_cli.config import FaceConfig
    from lightningcp_cli.stages.face import analyze_face, load_image

    from .cli_util import FACE

    face = analyze_face(load_image(FACE), FaceConfig(), 128, source=str(FACE))
    x0, y0, x1, y1, height = face.mouth_geometry().tolist()
    ys, xs = np.nonzero(face.mouth_mask)
    for x, y in ((x0, y0), (x1, y1)):  # both corners inside the mouth box
        assert xs.min() <= x <= xs.max() + 1 and ys.min() <= y <= ys.max() + 1
    assert x1 - x0 > 8 and 30 < height < 128


def test_box_only_faces_get_a_mouth_geometry_inside_the_mouth_box():
    from lightningcp_cli.config import FaceConfig
    from lightningcp_cli.stages.face import build_analysis

    image = np.full((128, 128, 3), 128, np.uint8)
    face = build_analysis(image, (32, 32, 96, 96), FaceConfig(), 128)  # no face mesh
    assert face.crop_landmarks is None
    x0, y0, x1, y1, height = face.mouth_geometry().tolist()
    ys, xs = np.nonzero(face.mouth_mask)
    assert xs.min() < x0 < x1 < xs.max() + 1 and y0 == y1
    assert ys.min() <= y0 <= ys.max() + 1 and height > 0
