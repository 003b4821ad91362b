"""``lcp batch --ray local``: the same jobs on a local Ray instance give the same results
(statuses, fingerprints, decoded frames) as the local batch."""

from __future__ import annotations

import json
import shutil

import imageio_ffmpeg
import numpy as np
import pytest

from .cli_util import DATA, FACE, run_lcp
from .test_batch import SHORT, TINY, weights  # noqa: F401  (the weights fixture)

pytest.importorskip("ray")


def _frames(path) -> list[np.ndarray]:
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    w, h = meta["size"]
    return [np.frombuffer(f, np.uint8).reshape(h, w, 3) for f in reader]


def test_ray_batch_matches_the_local_batch(tmp_path, weights):  # noqa: F811
    runs = {}
    for name, extra in (("local", []), ("ray", ["--ray", "local"])):
        folder = tmp_path / name
        folder.mkdir()
        shutil.copy(FACE, folder / "face.png")
        shutil.copy(SHORT, folder / "short.flac")
        shutil.copy(DATA / "no_face.png", folder / "no_face.png")
        lines = [
            {"face": "face.png", "audio": "short.flac", "output": "out/a.mp4"},
            {"face": "no_face.png", "audio": "short.flac", "output": "out/nf.mp4"},
            {"face": "face.png", "audio": "short.flac", "output": "out/b.mp4", "seed": 7},
        ]
        jobs = folder / "jobs.jsonl"
        jobs.write_text("".join(json.dumps(j) + "\n" for j in lines))
        proc = run_lcp(
            "batch", jobs, *TINY, "--weights", weights, "--json", *extra, cache_dir=folder / "c"
        )
        assert proc.returncode == 23, proc.stderr  # the no-face line fails in both
        runs[name] = (folder, json.loads(proc.stdout))
    (local_dir, local), (ray_dir, ray) = runs["local"], runs["ray"]
    strip = lambda r: {k: r[k] for k in ("line", "status", "exit_code", "frames")}  # noqa: E731
    assert [strip(r) for r in ray["jobs"]] == [strip(r) for r in local["jobs"]]
    assert ray["totals"] == local["totals"] == {"jobs": 3, "ok": 2, "skipped": 0, "failed": 1}
    for name in ("a.mp4", "b.mp4"):
        sides = [json.loads((d / "out" / f"{name}.json").read_text()) for d in (local_dir, ray_dir)]
        assert sides[0]["batch"]["fingerprint"] == sides[1]["batch"]["fingerprint"]
        a, b = (_frames(d / "out" / name) for d in (local_dir, ray_dir))
        assert len(a) == len(b) == sides[0]["num_frames"]
        assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
