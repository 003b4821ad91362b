"""The static-feature cache: real safetensors files on disk."""

from __future__ import annotations

import torch

from lightningcp_cli.cache import FeatureCache, cache_key


def test_round_trip_and_listing(tmp_path):
    cache = FeatureCache(tmp_path)
    bank = {"down_blocks.0": torch.randn(1, 16, 8), "mid": torch.randn(1, 4, 8)}
    cache.save("refbank", "k1", bank, model="lcp-tiny")
    loaded = cache.load("refbank", "k1")
    assert loaded is not None and set(loaded) == set(bank)
    for name in bank:
        assert torch.equal(loaded[name], bank[name])
    (entry,) = cache.entries()
    assert (entry.kind, entry.key, entry.model) == ("refbank", "k1", "lcp-tiny")
    assert not list(tmp_path.glob("*.lcp-tmp"))  # the atomic write left no temp file


def test_missing_entry_is_none(tmp_path):
    assert FeatureCache(tmp_path).load("refbank", "nope") is None


def test_damaged_entry_is_detected_and_removed(tmp_path):
    cache = FeatureCache(tmp_path)
    path = cache.save("refbank", "k", {"a": torch.arange(64, dtype=torch.float32)})
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF  # flip bits inside the tensor payload: still parses, digest differs
    path.write_bytes(bytes(raw))
    assert cache.load("refbank", "k") is None
    assert not path.exists()
    path.write_bytes(b"not a safetensors file")
    assert cache.load("refbank", "k") is None


def test_clear(tmp_path):
    cache = FeatureCache(tmp_path)
    for k in ("a", "b"):
        cache.save("refbank", k, {"x": torch.zeros(2)})
    assert cache.clear() == 2
    assert cache.entries() == []


def test_cache_key_depends_on_every_part():
    base = cache_key(b"pixels", "lcp-tiny", "float32")
    assert base == cache_key(b"pixels", "lcp-tiny", "float32")
    assert base != cache_key(b"pixelz", "lcp-tiny", "float32")
    assert base != cache_key(b"pixels", "lcp-tiny", "bfloat16")
    assert cache_key(b"ab", "c") != cache_key(b"a", "bc")  # parts are length-prefixed


def _hammer(root: str, worker: int, rounds: int) -> list[str]:
    """Save and load one shared entry ``rounds`` times; returns what was wrong."""
    cache = FeatureCache(root)
    problems = []
    for i in range(rounds):
        value = torch.full((256, 64), float(worker * 1000 + i))
        cache.save("refbank", "shared", {"a": value, "b": value * 2}, model="lcp-tiny")
        got = cache.load("refbank", "shared")
        if got is None:  # a damaged entry would be detected, removed and reported here
            problems.append(f"worker {worker} round {i}: entry missing or damaged")
        elif not torch.equal(got["b"], got["a"] * 2) or got["a"].unique().numel() != 1:
            problems.append(f"worker {worker} round {i}: a mix of two writers")
    return problems


def test_concurrent_processes_sharing_the_cache_never_see_a_torn_entry(tmp_path):
    """Two processes writing and reading the same entry: atomic renames mean every read
    is one writer's whole entry, and no temp file is left behind.  (This caught a real
    race: reading tensors and digest through two opens paired two versions, so a good
    entry looked damaged and was deleted.)"""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(2) as pool:
        results = pool.starmap(_hammer, [(str(tmp_path), w, 150) for w in range(2)])
    assert results == [[], []]
    assert not list(tmp_path.glob("*tmp*"))
    assert len(FeatureCache(tmp_path).entries()) == 1
