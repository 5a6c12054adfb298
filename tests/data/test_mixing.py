"""Mixing: the interleavings of each mode, weighted shares, shuffling, the split, and shard dealing."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from pdt.data.documents import DataSourceError
from pdt.data.mixing import DocStream, Mixer, is_validation, uniform
from pdt.data.sources import open_sources
from pdt.presets.schema import JsonlSource, WikiVitalSource


def jsonl_sources(tmp_path, sizes: dict[str, int], weights: dict[str, float] | None = None):
    """One JSONL source per name, docs "<name><i>", opened in the given order."""
    cfgs = []
    for name, n in sizes.items():
        path = tmp_path / f"{name}.jsonl"
        lines = "".join(json.dumps({"text": f"{name}{i}"}) + "\n" for i in range(n))
        path.write_text(lines, encoding="utf-8")
        cfgs.append(JsonlSource(path=str(path), field="text", weight=(weights or {}).get(name, 1.0)))
    return open_sources(cfgs)


def texts(stream: DocStream, n: int) -> list[str]:
    out = []
    for _ in range(n):
        doc = stream.next()
        if doc is None:
            break
        out.append(doc.text)
    return out


def stream(
    sources, mode, seed=0, shuffle=False, fraction=0.0, split="train", shard=0, n_shards=1, max_epochs=None
) -> DocStream:
    return DocStream(Mixer(sources, mode, seed, shuffle, max_epochs), split, fraction, shard, n_shards)


def test_round_robin_interleaves_and_drops_exhausted(tmp_path):
    sources = jsonl_sources(tmp_path, {"A": 3, "B": 1, "C": 2})
    epoch = ["A0", "B0", "C0", "A1", "C1", "A2"]
    assert texts(stream(sources, "round_robin"), 12) == epoch + epoch


def test_sequential_reads_source_after_source(tmp_path):
    sources = jsonl_sources(tmp_path, {"A": 3, "B": 1, "C": 2})
    epoch = ["A0", "A1", "A2", "B0", "C0", "C1"]
    assert texts(stream(sources, "sequential"), 12) == epoch + epoch
    assert texts(stream(sources, "sequential", max_epochs=1), 100) == epoch


def test_weighted_shares_follow_weights_and_are_seeded(tmp_path):
    sources = jsonl_sources(tmp_path, {"A": 5, "B": 7}, weights={"A": 3.0, "B": 1.0})
    drawn = texts(stream(sources, "weighted", seed=1), 4000)
    share = Counter(t[0] for t in drawn)["A"] / len(drawn)
    assert abs(share - 0.75) < 0.03
    assert texts(stream(sources, "weighted", seed=1), 200) == drawn[:200]
    assert texts(stream(sources, "weighted", seed=2), 200) != drawn[:200]
    # each source cycles through all of its documents before repeating one
    a_docs = [t for t in drawn if t[0] == "A"]
    assert sorted(a_docs[:5]) == [f"A{i}" for i in range(5)] and a_docs[5:10] == a_docs[:5]


def test_weighted_finite_pass_reads_each_document_once(tmp_path):
    sources = jsonl_sources(tmp_path, {"A": 5, "B": 7}, weights={"A": 3.0, "B": 1.0})
    drawn = texts(stream(sources, "weighted", seed=3, shuffle=True, max_epochs=1), 100)
    assert sorted(drawn) == sorted([f"A{i}" for i in range(5)] + [f"B{i}" for i in range(7)])


def test_uniform_is_a_pure_function():
    values = [uniform(7, 0, d) for d in range(2000)]
    assert values == [uniform(7, 0, d) for d in range(2000)]
    assert all(0.0 <= v < 1.0 for v in values) and abs(sum(values) / len(values) - 0.5) < 0.03
    assert uniform(7, 1, 0) != uniform(7, 0, 0) != uniform(8, 0, 0)


def test_shuffle_is_a_new_permutation_each_epoch(tmp_path):
    (source,) = jsonl_sources(tmp_path, {"A": 50})
    s = stream([source], "round_robin", seed=5, shuffle=True)
    first, second = texts(s, 50), texts(s, 50)
    assert sorted(first) == sorted(second) == sorted(f"A{i}" for i in range(50))
    assert first != second and first != [f"A{i}" for i in range(50)]
    assert texts(stream([source], "round_robin", seed=5, shuffle=True), 50) == first
    assert texts(stream([source], "round_robin", seed=6, shuffle=True), 50) != first


@pytest.fixture(scope="module")
def wiki():
    return open_sources([WikiVitalSource()])


def test_validation_split_is_stable_and_disjoint(wiki):
    def ids(mode, seed, shuffle, split, shard=0, n_shards=1):
        s = stream(wiki, mode, seed, shuffle, 0.02, split, shard, n_shards, max_epochs=1)
        out = []
        while (doc := s.next()) is not None:
            out.append(doc.id)
        return out

    val = ids("sequential", 0, False, "validation")
    assert 150 < len(val) < 260  # ~2% of 10,033
    assert set(ids("round_robin", 99, True, "validation")) == set(val)
    sharded = [ids("weighted", 4, True, "validation", k, 3) for k in range(3)]
    assert set().union(*map(set, sharded)) == set(val) and sum(map(len, sharded)) == len(val)
    train = ids("round_robin", 1, True, "train")
    assert not set(train) & set(val) and len(train) + len(val) == 10033
    assert all(is_validation("wiki_vital", i, 0.02) for i in val)
    assert not any(is_validation("wiki_vital", i, 0.0) for i in val)


def test_shards_are_disjoint_and_cover_the_split(tmp_path):
    sources = jsonl_sources(tmp_path, {"A": 11, "B": 6, "C": 9})
    full = texts(stream(sources, "round_robin", seed=2, shuffle=True, max_epochs=1), 100)
    parts = [
        texts(stream(sources, "round_robin", 2, True, 0.0, "train", k, 4, max_epochs=1), 100)
        for k in range(4)
    ]
    assert [t for k in range(4) for t in parts[k]] != full  # really split...
    assert sorted(t for p in parts for t in p) == sorted(full)  # ...into disjoint parts covering all
    assert parts[1] == full[1::4]


def test_state_restores_the_exact_position(tmp_path):
    sources = jsonl_sources(tmp_path, {"A": 4, "B": 3}, weights={"A": 1.0, "B": 2.0})
    for mode in ("round_robin", "sequential", "weighted"):
        s = stream(sources, mode, seed=9, shuffle=True)
        texts(s, 10)
        state = json.loads(json.dumps(s.state_dict()))
        expected = texts(s, 15)
        fresh = stream(sources, mode, seed=9, shuffle=True)
        fresh.load_state_dict(state)
        assert texts(fresh, 15) == expected, mode


def test_a_starved_shard_is_an_error(tmp_path):
    sources = jsonl_sources(tmp_path, {"A": 1, "B": 2})
    # order A0 B0 B1 | A0 B0 B1: dealing continues across epochs (odd epochs give shard 1 "A0")
    assert texts(stream(sources, "round_robin", shard=1, n_shards=2), 3) == ["B0", "A0", "B1"]
    with pytest.raises(DataSourceError, match="shard 0 of 1 found no readable validation documents"):
        stream(sources, "weighted", split="validation", fraction=0.0).next()


def test_unknown_mode(tmp_path):
    with pytest.raises(DataSourceError, match="unknown mix mode"):
        Mixer(jsonl_sources(tmp_path, {"A": 1}), "random", 0, False)
