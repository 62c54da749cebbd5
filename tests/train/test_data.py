"""MQAR generator, text packing and the checkpointable per-process iterator."""

from __future__ import annotations

import numpy as np
import pytest

from train import data

SPEC = data.MQARSpec(seq_len=64, vocab_size=128, num_kv_pairs=8, seed=3)


# ---- MQAR ------------------------------------------------------------------------------------


def test_mqar_is_deterministic_per_seed_and_index():
    a = data.mqar_example(SPEC, 17)
    b = data.mqar_example(SPEC, 17)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    other_index = data.mqar_example(SPEC, 18)
    other_seed = data.mqar_example(data.MQARSpec(seq_len=64, vocab_size=128, num_kv_pairs=8), 17)
    assert not np.array_equal(a["tokens"], other_index["tokens"])
    assert not np.array_equal(a["tokens"], other_seed["tokens"])


@pytest.mark.parametrize("index", [0, 1, 99, 12345])
def test_mqar_answers_are_the_values_bound_to_the_query_keys(index):
    n, t, v = SPEC.num_kv_pairs, SPEC.seq_len, SPEC.vocab_size
    ex = data.mqar_example(SPEC, index)
    tokens, targets, mask = ex["tokens"], ex["targets"], ex["mask"]
    assert tokens.shape == targets.shape == mask.shape == (t,)
    assert tokens.dtype == np.int32 and targets.dtype == np.int32
    keys, values = tokens[0 : 2 * n : 2], tokens[1 : 2 * n : 2]
    assert len(set(keys.tolist())) == n, "keys must be distinct"
    assert np.all((keys >= 1) & (keys < v // 2)) and np.all((values >= v // 2) & (values < v))
    bound = dict(zip(keys.tolist(), values.tolist(), strict=True))
    queries = np.nonzero(mask)[0]
    assert len(queries) == n and np.all(queries >= 2 * n) and np.all((queries - 2 * n) % 2 == 0)
    for pos in queries:
        assert targets[pos] == bound[int(tokens[pos])]
    # Outside the context and the query keys the sequence is filler (0), with no targets.
    filler = np.ones(t, bool)
    filler[: 2 * n] = False
    filler[queries] = False
    assert np.all(tokens[filler] == 0) and np.all(mask[~np.isin(np.arange(t), queries)] == 0)


def test_mqar_query_gaps_follow_the_power_law():
    spec = data.MQARSpec(seq_len=40, vocab_size=64, num_kv_pairs=1, power_a=0.5, seed=1)
    gaps = [
        (int(np.nonzero(data.mqar_example(spec, i)["mask"])[0][0]) - 2) // 2 for i in range(4000)
    ]
    freq = np.bincount(gaps, minlength=spec.query_slots) / len(gaps)
    # With one pair the draw is exactly P(g) ∝ (g+1)^(a-1).
    np.testing.assert_allclose(freq, spec.gap_probs, atol=0.03)
    assert freq[0] > freq[-1]


def test_mqar_eval_split_is_held_out():
    train = {data.mqar_example(SPEC, i)["tokens"].tobytes() for i in range(200)}
    held = {data.mqar_example(SPEC, i, split=1)["tokens"].tobytes() for i in range(200)}
    assert not train & held


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(seq_len=16, num_kv_pairs=8), "seq_len must be >= 4 \\* num_kv_pairs"),
        (dict(vocab_size=8, num_kv_pairs=4, seq_len=64), "vocab_size must give at least"),
        (dict(num_kv_pairs=0), "num_kv_pairs must be positive"),
        (dict(power_a=0.0), "power_a must be in"),
    ],
    ids=["short_seq", "small_vocab", "no_pairs", "bad_power"],
)
def test_mqar_bad_spec(kwargs, match):
    with pytest.raises(ValueError, match=match):
        data.MQARSpec(**kwargs)


# ---- text packing ----------------------------------------------------------------------------


def _write(tmp_path, text, name="a.txt"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_packing_rows_and_segment_ids(tmp_path):
    path = _write(tmp_path, "abcde\n\nfg\n\nhijklmnop qrstu\n")
    docs = data.load_documents([path])
    assert docs == [b"abcde", b"fg", b"hijklmnop qrstu"]
    rows = data.PackedRows(data.grain.MapDataset.source(docs), seq_len=8)
    stream = [data.BOS, *b"abcde", data.BOS, *b"fg", data.BOS, *b"hijklmnop qrstu"]
    assert len(rows) == -(-(len(stream) - 1) // 8)
    got_targets = []
    for r in range(len(rows)):
        row = rows[r]
        lo = 8 * r
        want = stream[lo : lo + 9]
        n = len(want) - 1
        np.testing.assert_array_equal(row["tokens"][: len(want[:-1])], want[:-1][:8])
        np.testing.assert_array_equal(row["targets"][:n], want[1:])
        seg = row["segment_ids"]
        # Segment ids start at 1, increase by one at every BOS inside the row, 0 = padding.
        for i in range(1, 8):
            if i < len(want) and row["tokens"][i] == data.BOS:
                assert seg[i] == seg[i - 1] + 1
            elif seg[i] > 0:
                assert seg[i] == seg[i - 1]
        assert seg[0] == 1
        # No target crosses into another document; padding is never a target.
        for i in range(8):
            crosses = row["targets"][i] == data.BOS and row["mask"][i] == 0
            if row["mask"][i]:
                assert row["targets"][i] != data.BOS
            elif seg[i] > 0 and i < n:
                assert crosses
        got_targets += [int(x) for x, m in zip(row["targets"], row["mask"], strict=True) if m]
    # Every byte of every document is predicted exactly once.
    assert sorted(got_targets) == sorted(b"abcde" + b"fg" + b"hijklmnop qrstu")


def test_packing_pads_the_last_row(tmp_path):
    rows = data.PackedRows(data.grain.MapDataset.source([b"xyz"]), seq_len=8)
    row = rows[0]
    np.testing.assert_array_equal(row["segment_ids"], [1, 1, 1, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(row["mask"], [1, 1, 1, 0, 0, 0, 0, 0])


def test_embedded_corpus_needs_no_download():
    path = data.default_corpus_path()
    assert path.is_file() and path.stat().st_size < 200_000
    train, val, info = data.text_datasets((), seq_len=64, val_fraction=0.05, seed=0)
    assert info["documents"] > 20 and info["val_bytes"] > 0 and len(train) > 10 and len(val) > 0


def test_missing_text_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.text_files: no such file .*nope.txt"):
        data.load_documents([tmp_path / "nope.txt"])


def test_document_split_is_stable_and_disjoint():
    docs = [f"document number {i}".encode() for i in range(400)]
    train, val = data.split_documents(docs, 0.1)
    assert set(train).isdisjoint(val) and len(train) + len(val) == 400
    assert 20 < len(val) < 70
    train2, val2 = data.split_documents(docs + [b"a new document"], 0.1)
    assert set(val) <= set(val2)


# ---- iterator ---------------------------------------------------------------------------------


def _indices(batches):
    return [int(i) for b in batches for i in b["index"]]


def test_iterator_restore_neither_repeats_nor_skips():
    ds = data.mqar_dataset(SPEC)
    it = data.ProcessBatches(ds, global_batch=4, num_threads=1)
    first = [next(it) for _ in range(3)]
    state = it.get_state()
    rest = [next(it) for _ in range(3)]
    resumed = data.ProcessBatches(ds, global_batch=4, num_threads=1)
    resumed.set_state(state)
    again = [next(resumed) for _ in range(3)]
    assert _indices(again) == _indices(rest)
    for a, b in zip(rest, again, strict=True):
        np.testing.assert_array_equal(a["tokens"], b["tokens"])
    seen = _indices(first) + _indices(again)
    assert seen == list(range(24))


def test_shuffled_text_rows_resume_exactly(tmp_path):
    train, _, _ = data.text_datasets((), seq_len=32, val_fraction=0.05, seed=0)
    ds = train.shuffle(seed=5).repeat()
    it = data.ProcessBatches(ds, global_batch=8, num_threads=1)
    for _ in range(2):
        next(it)
    state = it.get_state()
    want = [next(it)["tokens"] for _ in range(3)]
    it2 = data.ProcessBatches(ds, global_batch=8, num_threads=1)
    it2.set_state(state)
    for w in want:
        np.testing.assert_array_equal(next(it2)["tokens"], w)


def test_process_rows_partition_the_global_batch():
    ds = data.mqar_dataset(SPEC)
    whole = data.ProcessBatches(ds, global_batch=6, num_threads=1)
    parts = [
        data.ProcessBatches(ds, 6, data.process_rows(6, p, 3), num_threads=1) for p in range(3)
    ]
    for _ in range(2):
        w = next(whole)
        joined = np.concatenate([next(p)["tokens"] for p in parts])
        np.testing.assert_array_equal(joined, w["tokens"])


def test_batch_not_divisible_by_processes():
    with pytest.raises(ValueError, match="batch_size=10 must be divisible by the number of proc"):
        data.process_rows(10, 0, 4)


def test_eval_batches_pad_with_masked_rows():
    ds = data.mqar_dataset(SPEC, 10, split=1)
    batches = data.eval_batches(ds, 4)
    assert len(batches) == 3
    assert batches[-1]["mask"][2:].sum() == 0 and batches[-1]["mask"][:2].sum() > 0
