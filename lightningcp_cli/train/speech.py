"""Speech corpus of the data engine: utterances with log-mel features and mouth curves.

Sources (see ``docs/DATA_ENGINE.md`` for licences):

- espeak-ng (the Debian package, run as a program) speaking the built-in sentences
  (:data:`SENTENCES`, written for this project) and random word sequences
  (:data:`WORDS`) with many voices, rates (130-200 wpm), pitches and word gaps, with
  random leading/trailing silence, then background noise, a little room reverb and a
  tilt EQ so the features are less clean than a formant synthesiser's;
- the real clips committed in ``assets/speech/`` (16 kHz, EchoMimic assets), each also
  in speed-perturbed, noisy variants;
- optional held-out clips from elsewhere (``walden.wav``, ``jane.wav``).

Each utterance stores the 16 kHz waveform (int16, optional to save space), the features
of the bundled model's audio encoder (``MelAudioEncoder``: ``[T, 1, 80]`` at 50 Hz,
stored float16) and two curves at the same 50 Hz frames, the mouth's ``opening`` in
[0, 1] and ``width`` in [-1, 1], derived from the *clean* audio by
:func:`~lightningcp_cli.stages.motion.mouth_curves` (which a render of lcp-tiny also runs
on its speech, for the mouth track).

The corpus is ONE safetensors file (all utterances concatenated, with offsets; the
manifest in its metadata) plus the same manifest as JSON.  :class:`SpeechCorpus` reads
it with numpy + safetensors only.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..stages.motion import FEATURE_RATE, HOP, SAMPLE_RATE, mouth_curves

__all__ = [
    "ASSET_SPEECH",
    "FEATURE_RATE",
    "HELDOUT_CLIPS",
    "HELDOUT_VARIANTS",
    "SAMPLE_RATE",
    "SENTENCES",
    "TRAIN_CLIPS",
    "WORDS",
    "SpeechCorpus",
    "Utterance",
    "build_speech_corpus",
    "espeak_available",
    "espeak_voices",
    "frame_envelope",
    "make_utterance",
    "mouth_curves",
    "synthesize",
]

ASSET_SPEECH = Path(__file__).parent / "assets" / "speech"
#: Real clips trained on (committed in ``assets/speech/``).  ``echomimic_en_girl`` is also
#: ``examples/speech2.wav``.
TRAIN_CLIPS: tuple[str, ...] = ("echomimic_en_girl", "echomimic", "chunwang")
#: Real clips for evaluation only: never committed here, never trained on.  The example
#: clip ``lightningcp_cli/assets/speech.wav`` (= ``echomimic_en.wav``) is also kept out.
HELDOUT_CLIPS: tuple[str, ...] = ("walden", "jane")
EXCLUDED_CLIPS: tuple[str, ...] = ("echomimic_en",)

ProgressFn = Callable[[str, int, int], None]

# --------------------------------------------------------------------------- text

#: Sentences written for this project (public domain-like, no source).  Every 8th one
#: (index % 8 == 7) is held out.
SENTENCES: tuple[str, ...] = (
    "The morning train was late again, so we walked along the river instead.",
    "Please put the blue box on the top shelf before you leave.",
    "My grandmother keeps a jar of buttons that nobody is allowed to touch.",
    "Could you tell me where the nearest pharmacy is?",
    "We painted the fence white, and the neighbours painted theirs green.",
    "Thirty seven people signed up for the pottery class this week.",
    "I honestly thought the movie would be longer than that.",
    "A small orange cat slept on the warm hood of the car.",
    "Turn left at the bakery, then keep going until you see the bridge.",
    "Every spring the old oak tree fills with noisy starlings.",
    "She laughed so hard that she dropped her sandwich in the pond.",
    "The committee will announce its decision on Thursday afternoon.",
    "Bring a jacket, because the wind on the hill can be very cold.",
    "Why does the kettle always boil over when I look away?",
    "Our team finished the puzzle in just under four hours.",
    "He plays the violin badly but with enormous enthusiasm.",
    "The library closes early on public holidays.",
    "Fresh bread, soft cheese and ripe tomatoes make a perfect lunch.",
    "If the printer jams again, just switch it off and on.",
    "We watched the storm roll in from the ocean.",
    "Nobody expected the quiet student to win the chess tournament.",
    "The museum has a whale skeleton hanging from the ceiling.",
    "Do you prefer coffee in the morning or tea in the evening?",
    "My phone battery died halfway through the call.",
    "They built a tiny house out of recycled shipping containers.",
    "Measure twice and cut once, my uncle used to say.",
    "The children chased bubbles across the playground.",
    "Please remember to water the tomatoes while I am away.",
    "A thick fog covered the valley until almost noon.",
    "I will meet you outside the cinema at half past seven.",
    "The recipe calls for two eggs, a cup of flour and a pinch of salt.",
    "Some birds fly thousands of miles every winter.",
    "Wow, that was the loudest thunder I have ever heard!",
    "The mechanic said the brakes need to be replaced soon.",
    "Our neighbour grows enormous pumpkins in her back garden.",
    "Write your name clearly at the top of every page.",
    "The bus driver waved at us as we ran to catch it.",
    "Honey never spoils if you keep the lid closed.",
    "We should probably leave before the traffic gets worse.",
    "The old clock in the hallway chimes every quarter hour.",
    "My brother borrowed my bicycle and returned it with a flat tyre.",
    "Look at the way the light falls across the water.",
    "It took the builders three months to finish the roof.",
    "Apples, pears and plums were piled high in the market.",
    "I can never remember whether it is my turn to cook.",
    "The violinist bowed, and the audience rose to its feet.",
    "Keep the receipt in case you want to return the shoes.",
    "A gentle breeze moved the curtains in the open window.",
    "Seven hundred and twelve books were donated to the school.",
    "What time does the last ferry leave for the island?",
    "The puppy chewed through the cable of my headphones.",
    "We camped beside a lake so still it looked like glass.",
    "Her speech was short, funny and surprisingly moving.",
    "The soup needs a little more pepper, I think.",
    "Under the floorboards they found a box of old letters.",
    "Switch off the lights when you leave the room, please.",
    "He jogged around the park before breakfast every day.",
    "The mountains looked purple in the evening light.",
    "Most of the guests arrived just as the rain began.",
    "I would like a window seat, if one is still available.",
    "The baker wakes up at four to prepare the morning rolls.",
    "Can you believe how quickly this year has gone by?",
    "Jazz music drifted out of the little cafe on the corner.",
    "We need more chairs for the meeting in the big room.",
    "The farmer checked the fences after the storm.",
    "Be careful, the floor is still wet.",
    "Our flight was delayed by almost three hours.",
    "She knitted a long red scarf for each of her nephews.",
    "The scientist explained the results with a simple drawing.",
    "Yellow leaves covered the path through the woods.",
    "I think we took a wrong turn a few miles back.",
    "The choir practised the same song over and over.",
    "Hot chocolate tastes better after a long walk in the snow.",
    "Please speak slowly, my English is still improving.",
    "The street market opens early on Saturday mornings.",
    "A lighthouse stood alone at the end of the rocky pier.",
    "Most people underestimate how long a project will take.",
    "The kitten watched the goldfish with great interest.",
    "We ordered pizza because nobody wanted to cook.",
    "The train to the airport leaves from platform nine.",
    "Good ideas often arrive when you stop looking for them.",
    "The hikers reached the summit just before sunset.",
    "Would you mind closing the door behind you?",
    "The garden smelled of roses and freshly cut grass.",
    "It is hard to read when the music is so loud.",
    "My cousin moved to a small village by the sea.",
    "The students cheered when the exam was cancelled.",
    "Every morning she writes three pages in her notebook.",
    "Our boat drifted slowly past the sleeping town.",
    "Check the map again, I am sure the hotel is near here.",
    "The volcano has not erupted for over a century.",
    "Thank you very much for your patience and your help.",
    "Zebras, giraffes and elephants gathered at the water hole.",
    "He fixed the wobbly table with a folded piece of paper.",
    "The sky cleared and the stars came out one by one.",
    "Let us begin the meeting with a short summary.",
)

#: Words for random sequences (varied vowels, bilabials, fricatives, numbers).
_WORD_TEXT = """
    apple banana mother father baby people purple bubble maybe moon music open
    paper pepper window yellow orange blue green black white water fire earth
    sky mountain river ocean island forest garden flower tree leaf seed
    book table chair door house street city village market school office
    morning evening night today tomorrow yesterday always never often sometimes
    one two three four five six seven eight nine ten twenty hundred thousand
    happy sad angry quiet loud soft hard fast slow early late big small tall
    short long round square bright dark warm cold fresh sweet bitter salty
    run walk jump swim sing dance read write speak listen watch look open close
    give take make bring carry pull push throw catch build break fix move stop
    eat drink sleep dream think believe remember forget laugh smile cry shout
    coffee tea bread cheese butter milk honey sugar salt rice soup pizza
    cat dog horse cow sheep mouse bird fish whale tiger zebra monkey rabbit
    car bus train plane boat bicycle rocket engine wheel road bridge tunnel
    red violet silver golden pink brown grey cream ruby amber jade olive
    hello goodbye please thanks yes no okay wow hey oh ah
    beautiful wonderful terrible possible important interesting comfortable
    photograph telephone television computer umbrella elephant kangaroo
    """
WORDS: tuple[str, ...] = tuple(_WORD_TEXT.split())

_BASE_VOICES = (
    "en",
    "en-us",
    "en-gb-x-rp",
    "en-gb-scotland",
    "en-gb-x-gbclan",
    "en-gb-x-gbcwmd",
    "en-029",
    "en-us-nyc",
)
_VARIANTS = (
    "",
    "m1",
    "m2",
    "m3",
    "m4",
    "m5",
    "m6",
    "m7",
    "f1",
    "f2",
    "f3",
    "f4",
    "f5",
    "klatt",
    "klatt2",
    "klatt3",
    "klatt4",
    "Alex",
    "Alicia",
    "Andrea",
    "Andy",
    "Annie",
    "Denis",
    "Gene",
    "Jacky",
    "Lee",
    "Michael",
    "Mike",
    "adam",
    "anika",
    "aunty",
    "belinda",
    "benjamin",
    "boris",
    "caleb",
    "david",
    "ed",
    "edward",
    "grandma",
    "iven",
    "john",
    "linda",
    "max",
    "norbert",
    "paul",
    "quincy",
    "rob",
    "robert",
    "steph",
    "steph2",
    "travis",
    "victor",
    "zac",
)
#: espeak-ng voice variants used only for held-out utterances.
HELDOUT_VARIANTS: tuple[str, ...] = ("f4", "m6", "belinda", "klatt3", "steph2")


def _heldout_sentence(i: int) -> bool:
    return i % 8 == 7


# --------------------------------------------------------------------------- espeak


def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


def espeak_voices() -> tuple[list[str], list[str]]:
    """(base voices, variants) of the curated lists that the installed espeak-ng has."""
    if not espeak_available():
        return [], []
    out = subprocess.run(
        ["espeak-ng", "--voices=en"], capture_output=True, text=True, check=False
    ).stdout
    langs = {line.split()[1] for line in out.splitlines()[1:] if len(line.split()) > 1}
    out = subprocess.run(
        ["espeak-ng", "--voices=variant"], capture_output=True, text=True, check=False
    ).stdout
    files = set()
    for line in out.splitlines()[1:]:
        for tok in line.split():
            if tok.startswith("!v/"):
                files.add(tok[3:])
    bases = [v for v in _BASE_VOICES if v in langs]
    variants = [v for v in _VARIANTS if v == "" or v in files]
    return bases, variants


def _parse_wav(data: bytes) -> tuple[np.ndarray, int]:
    """espeak-ng's streamed WAV (its sizes are placeholders): int16 mono and the rate."""
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise RuntimeError("espeak-ng did not return a WAV stream")
    pos, rate, bits, channels = 12, 22050, 16, 1
    while pos + 8 <= len(data):
        tag, size = data[pos : pos + 4], int.from_bytes(data[pos + 4 : pos + 8], "little")
        if tag == b"fmt ":
            channels = int.from_bytes(data[pos + 10 : pos + 12], "little")
            rate = int.from_bytes(data[pos + 12 : pos + 16], "little")
            bits = int.from_bytes(data[pos + 22 : pos + 24], "little")
            pos += 8 + size
        elif tag == b"data":
            pcm = data[pos + 8 :]
            if bits != 16 or channels != 1:
                raise RuntimeError("unexpected espeak-ng WAV format")
            pcm = pcm[: len(pcm) - len(pcm) % 2]
            return np.frombuffer(pcm, dtype="<i2").copy(), rate
        else:
            pos += 8 + size
    raise RuntimeError("espeak-ng WAV stream has no data")


def synthesize(
    text: str, voice: str = "en", rate: int = 160, pitch: int = 50, gap: int = 0
) -> np.ndarray:
    """Speak ``text`` with espeak-ng; float32 mono at 16 kHz.  Deterministic.

    ``voice`` is ``base`` or ``base+variant``, ``rate`` words per minute, ``pitch`` 0-99,
    ``gap`` extra pause between words in units of 10 ms.
    """
    if not espeak_available():
        raise RuntimeError("espeak-ng is not installed (apt-get install -y espeak-ng)")
    cmd = ["espeak-ng", "-v", voice, "-s", str(int(rate)), "-p", str(int(pitch))]
    cmd += ["-g", str(int(gap)), "--stdout", text]
    proc = subprocess.run(cmd, capture_output=True, check=False)
    if proc.returncode != 0 or not proc.stdout:
        raise RuntimeError(f"espeak-ng failed for voice {voice!r}: {proc.stderr.decode()[-200:]}")
    pcm, sr = _parse_wav(proc.stdout)
    x = pcm.astype(np.float32) / 32768.0
    return _resample(x, sr, SAMPLE_RATE)


def _resample(x: np.ndarray, sr: int, target: int) -> np.ndarray:
    if sr == target:
        return x.astype(np.float32)
    from math import gcd

    from scipy.signal import resample_poly

    g = gcd(int(sr), int(target))
    return resample_poly(x, target // g, sr // g).astype(np.float32)


# --------------------------------------------------------------------------- curves


def frame_envelope(samples: np.ndarray, fps: float, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """RMS of the speech in each video frame's interval ``[i/fps, (i+1)/fps)`` after a
    250-4000 Hz band-pass: a simple speech envelope per frame (for lip-sync checks)."""
    from ..stages.audio import num_video_frames

    x = np.asarray(samples, np.float64).ravel()
    n = num_video_frames(len(x) / sample_rate, fps)
    spec = np.fft.rfft(x)
    f = np.fft.rfftfreq(len(x), 1.0 / sample_rate)
    spec[(f < 250) | (f > 4000)] = 0
    y = np.fft.irfft(spec, len(x))
    edges = (np.arange(n + 1) * sample_rate / fps).round().astype(int)
    out = np.zeros(n)
    for i in range(n):
        seg = y[edges[i] : min(edges[i + 1], len(y))]
        out[i] = np.sqrt(np.mean(seg**2)) if len(seg) else 0.0
    return out


# --------------------------------------------------------------------------- utterances


@dataclass(frozen=True, eq=False)
class Utterance:
    """One utterance.  ``samples`` is empty when the corpus did not keep the waveform."""

    uid: str
    split: str  # "train" | "heldout"
    source: str  # "espeak" | "clip" | "synthetic"
    mel: np.ndarray  # [T, 1, 80] float16 (MelAudioEncoder features at 50 Hz)
    opening: np.ndarray  # [T] float32 in [0, 1]
    width: np.ndarray  # [T] float32 in [-1, 1]
    samples: np.ndarray  # [N] int16 at 16 kHz, or [0]
    info: dict = field(default_factory=dict)  # text, voice, rate, pitch, augmentation ...

    @property
    def num_features(self) -> int:
        return int(self.mel.shape[0])

    @property
    def duration(self) -> float:
        """Seconds (from the features: ``T / 50``)."""
        return self.num_features / FEATURE_RATE


def _to_int16(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round(np.asarray(x, np.float64) * 32767.0), -32768, 32767).astype(np.int16)


def make_utterance(
    uid: str,
    samples: np.ndarray,
    *,
    split: str = "train",
    source: str = "synthetic",
    clean: np.ndarray | None = None,
    keep_waveform: bool = True,
    info: dict | None = None,
) -> Utterance:
    """Features and curves of one 16 kHz float waveform.  ``clean`` (same length) is the
    signal the mouth curves come from when ``samples`` carries added noise/reverb.
    Needs librosa (the encoder's mel filters): build time only."""
    from ..models.audio_encoder import MelAudioEncoder

    x = np.asarray(samples, np.float32).ravel()
    if len(x) < HOP:
        raise ValueError(f"{uid}: utterance shorter than one feature frame")
    x16 = _to_int16(x)
    xq = x16.astype(np.float32) / 32767.0  # features of exactly what is stored
    mel = MelAudioEncoder().encode(xq).numpy()
    opening, width = mouth_curves(xq if clean is None else clean)
    t = mel.shape[0]
    opening, width = opening[:t], width[:t]
    return Utterance(
        uid=uid,
        split=split,
        source=source,
        mel=mel.astype(np.float16),
        opening=opening,
        width=width,
        samples=x16 if keep_waveform else np.zeros(0, np.int16),
        info=dict(info or {}),
    )


# --------------------------------------------------------------------------- corpus


class SpeechCorpus:
    """Utterances in memory; saved/loaded as one safetensors file (+ JSON manifest)."""

    def __init__(self, utterances: Sequence[Utterance], meta: dict | None = None) -> None:
        self.utterances = list(utterances)
        self.meta = dict(meta or {})
        ids = [u.uid for u in self.utterances]
        if len(set(ids)) != len(ids):
            raise ValueError("utterance ids must be unique")

    def __len__(self) -> int:
        return len(self.utterances)

    def __getitem__(self, i: int) -> Utterance:
        return self.utterances[i]

    def indices(self, split: str) -> list[int]:
        return [i for i, u in enumerate(self.utterances) if u.split == split]

    def seconds(self, split: str | None = None) -> float:
        return float(sum(u.duration for u in self.utterances if split in (None, u.split)))

    def save(self, path: str | Path) -> Path:
        from safetensors.numpy import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        us = self.utterances
        f_off = np.cumsum([0] + [u.num_features for u in us]).astype(np.int64)
        w_off = np.cumsum([0] + [len(u.samples) for u in us]).astype(np.int64)
        mel = np.concatenate([u.mel for u in us]) if us else np.zeros((0, 1, 80), np.float16)
        cat = lambda name, dt: (  # noqa: E731
            np.concatenate([getattr(u, name).astype(dt) for u in us]) if us else np.zeros(0, dt)
        )
        entries = [
            {
                "uid": u.uid,
                "split": u.split,
                "source": u.source,
                "seconds": round(u.duration, 3),
                **u.info,
            }
            for u in us
        ]
        manifest = {"format": "lcp-speech-corpus/1", "utterances": entries, **self.meta}
        text = json.dumps(manifest, indent=1, sort_keys=True)
        save_file(
            {
                "mel": np.ascontiguousarray(mel.astype(np.float16)),
                "opening": cat("opening", np.float16),
                "width": cat("width", np.float16),
                "wave": cat("samples", np.int16),
                "frame_offsets": f_off,
                "wave_offsets": w_off,
            },
            str(path),
            metadata={"manifest": text},
        )
        path.with_suffix(".json").write_text(text + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> SpeechCorpus:
        from safetensors import safe_open
        from safetensors.numpy import load_file

        path = Path(path)
        a = load_file(str(path))
        with safe_open(str(path), framework="numpy") as f:
            manifest = json.loads((f.metadata() or {})["manifest"])
        fo, wo = a["frame_offsets"], a["wave_offsets"]
        us = []
        for i, e in enumerate(manifest["utterances"]):
            info = {k: v for k, v in e.items() if k not in ("uid", "split", "source", "seconds")}
            s, t = int(fo[i]), int(fo[i + 1])
            us.append(
                Utterance(
                    uid=e["uid"],
                    split=e["split"],
                    source=e["source"],
                    mel=a["mel"][s:t],
                    opening=a["opening"][s:t].astype(np.float32),
                    width=a["width"][s:t].astype(np.float32),
                    samples=a["wave"][int(wo[i]) : int(wo[i + 1])],
                    info=info,
                )
            )
        meta = {k: v for k, v in manifest.items() if k not in ("utterances", "format")}
        return cls(us, meta)


# --------------------------------------------------------------------------- augmentation


def _degrade(x: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """Room reverb (sometimes), a tilt EQ (sometimes) and background noise at 20-50 dB SNR."""
    from scipy.signal import fftconvolve, lfilter

    info: dict = {}
    y = x.astype(np.float64)
    if rng.random() < 0.35:
        rt60 = rng.uniform(0.08, 0.35)
        n = int(rt60 * SAMPLE_RATE)
        tt = np.arange(n) / SAMPLE_RATE
        ir = rng.standard_normal(n) * np.exp(-6.9 * tt / rt60)
        ir[0] = 0.0
        wet = rng.uniform(0.05, 0.3)
        tail = fftconvolve(y, ir)[: len(y)]
        tail *= wet * np.sqrt(np.mean(y**2)) / (np.sqrt(np.mean(tail**2)) + 1e-12)
        y = y + tail
        info["reverb"] = round(float(rt60), 3)
    if rng.random() < 0.5:
        k = rng.uniform(-0.6, 0.8)
        y = lfilter([1.0, -k], [1.0], y) / (1 + abs(k))
        info["tilt"] = round(float(k), 3)
    active = y[np.abs(y) > 0.02 * (np.abs(y).max() + 1e-12)]
    rms = float(np.sqrt(np.mean(active**2))) if len(active) else 0.0
    snr = rng.uniform(20, 50)
    noise = rng.standard_normal(len(y))
    if rng.random() < 0.5:  # brown-ish noise
        noise = lfilter([1.0], [1.0, -0.97], noise)
    noise *= rms * 10 ** (-snr / 20) / (np.sqrt(np.mean(noise**2)) + 1e-12)
    y = y + noise
    peak = np.abs(y).max() + 1e-12
    y *= rng.uniform(0.3, 0.95) / peak
    info["snr_db"] = round(float(snr), 1)
    return y.astype(np.float32), info


def _silence(rng: np.random.Generator, lo: float, hi: float) -> np.ndarray:
    return np.zeros(int(rng.uniform(lo, hi) * SAMPLE_RATE), np.float32)


def _espeak_utterance(
    uid: str,
    split: str,
    rng: np.random.Generator,
    bases: list[str],
    variants: list[str],
    keep: bool,
) -> Utterance:
    heldout = split == "heldout"
    pool = [i for i in range(len(SENTENCES)) if _heldout_sentence(i) == heldout]
    r = rng.random()
    if heldout or r < 0.6:
        text = SENTENCES[int(rng.choice(pool))]
    elif r < 0.8:
        a, b = rng.choice(pool, size=2, replace=False)
        text = f"{SENTENCES[int(a)]} {SENTENCES[int(b)]}"
    else:
        n = int(rng.integers(4, 13))
        words = [WORDS[int(i)] for i in rng.integers(0, len(WORDS), size=n)]
        for k in range(1, n - 1):
            if rng.random() < 0.15:
                words[k] += ","
        text = " ".join(words).capitalize() + "."
    v_pool = [v for v in variants if (v in HELDOUT_VARIANTS) == heldout]
    if not v_pool:
        v_pool = variants or [""]
    base = bases[int(rng.integers(len(bases)))] if bases else "en"
    variant = v_pool[int(rng.integers(len(v_pool)))]
    voice = base + (f"+{variant}" if variant else "")
    rate = int(rng.integers(130, 201))
    pitch = int(rng.integers(25, 76))
    gap = int(rng.choice([0, 0, 0, 1, 2, 4]))
    speech = synthesize(text, voice, rate, pitch, gap)
    if len(speech) > 9 * SAMPLE_RATE:  # keep utterances short: first 9 s
        speech = speech[: 9 * SAMPLE_RATE]
    peak = np.abs(speech).max() + 1e-9
    clean = np.concatenate([_silence(rng, 0.05, 0.6), speech / peak * 0.8, _silence(rng, 0.1, 0.7)])
    noisy, aug = _degrade(clean, rng)
    info = {"text": text, "voice": voice, "rate": rate, "pitch": pitch, "gap": gap, **aug}
    return make_utterance(
        uid, noisy, split=split, source="espeak", clean=clean, keep_waveform=keep, info=info
    )


def _clip_variants(
    name: str, x: np.ndarray, split: str, n_variants: int, rng: np.random.Generator, keep: bool
) -> list[Utterance]:
    out = [
        make_utterance(
            f"clip/{name}", x, split=split, source="clip", keep_waveform=True, info={"clip": name}
        )
    ]
    for k in range(n_variants):
        speed = float(rng.uniform(0.88, 1.12))
        y = _resample(x, int(round(SAMPLE_RATE * speed)), SAMPLE_RATE)
        noisy, aug = _degrade(y, rng)
        info = {"clip": name, "speed": round(speed, 3), **aug}
        out.append(
            make_utterance(
                f"clip/{name}/v{k}",
                noisy,
                split=split,
                source="clip",
                clean=y,
                keep_waveform=keep,
                info=info,
            )
        )
    return out


def _read_clip(path: Path) -> np.ndarray:
    from ..stages.audio import load_audio

    return load_audio(path, SAMPLE_RATE).samples


def build_speech_corpus(
    *,
    seed: int = 0,
    n_utterances: int = 480,
    n_heldout: int = 48,
    clips: Sequence[str | Path] | None = None,
    clip_variants: int = 7,
    heldout_clips: Sequence[str | Path] = (),
    use_espeak: bool | None = None,
    waveforms: str = "heldout",
    progress: ProgressFn | None = None,
) -> SpeechCorpus:
    """Build the speech corpus in memory (save it with :meth:`SpeechCorpus.save`).

    ``n_utterances``/``n_heldout`` espeak-ng utterances for train/held-out (skipped when
    ``use_espeak`` is False; None = when espeak-ng is installed); ``clips`` (default: the
    committed training clips) each with ``clip_variants`` augmented copies; the
    ``heldout_clips`` files as held-out utterances, unaugmented.  ``waveforms``: which
    waveforms to keep, ``"all"``, ``"heldout"`` (held-out utterances and the original
    clips) or ``"none"``.  Deterministic for a seed (and espeak-ng version).
    """
    if waveforms not in ("all", "heldout", "none"):
        raise ValueError("waveforms must be 'all', 'heldout' or 'none'")
    if use_espeak is None:
        use_espeak = espeak_available()
    if use_espeak and not espeak_available():
        raise RuntimeError("espeak-ng is not installed (apt-get install -y espeak-ng)")
    keep_train = waveforms == "all"
    keep_held = waveforms != "none"
    clip_paths = (
        [Path(p) for p in clips]
        if clips is not None
        else [ASSET_SPEECH / f"{c}.wav" for c in TRAIN_CLIPS]
    )
    for p in [*clip_paths, *map(Path, heldout_clips)]:
        if p.stem in EXCLUDED_CLIPS:
            raise ValueError(f"{p.name} is an example clip and must stay out of the corpus")
    for p in clip_paths:
        if p.stem in HELDOUT_CLIPS:
            raise ValueError(f"{p.name} is held out for evaluation; pass it as a held-out clip")

    bases, variants = espeak_voices() if use_espeak else ([], [])
    total = (n_utterances + n_heldout if use_espeak else 0) + len(clip_paths) + len(heldout_clips)
    done = 0
    utts: list[Utterance] = []

    def tick() -> None:
        nonlocal done
        done += 1
        if progress:
            progress("speech", done, total)

    for p in clip_paths:
        rng = np.random.default_rng([int(seed), 1, sum(p.stem.encode())])
        utts += _clip_variants(p.stem, _read_clip(p), "train", clip_variants, rng, keep_train)
        tick()
    for p in map(Path, heldout_clips):
        utts.append(
            make_utterance(
                f"clip/{p.stem}",
                _read_clip(p),
                split="heldout",
                source="clip",
                keep_waveform=keep_held,
                info={"clip": p.stem},
            )
        )
        tick()
    if use_espeak:
        for i in range(n_utterances):
            rng = np.random.default_rng([int(seed), 2, i])
            utts.append(
                _espeak_utterance(
                    f"espeak/train/{i:05d}", "train", rng, bases, variants, keep_train
                )
            )
            tick()
        for i in range(n_heldout):
            rng = np.random.default_rng([int(seed), 3, i])
            utts.append(
                _espeak_utterance(
                    f"espeak/heldout/{i:05d}", "heldout", rng, bases, variants, keep_held
                )
            )
            tick()
    meta = {
        "seed": int(seed),
        "sample_rate": SAMPLE_RATE,
        "feature_rate": FEATURE_RATE,
        "encoder": "mel80",
        "espeak": _espeak_version() if use_espeak else None,
        "waveforms": waveforms,
    }
    return SpeechCorpus(utts, meta)


def _espeak_version() -> str | None:
    if not espeak_available():
        return None
    out = subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True, check=False)
    return out.stdout.strip().split("  ")[0] or None
