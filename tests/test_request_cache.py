"""tunemake.request_cache on its own: a served answer is always the one stored under its key."""

import sqlite3

from tunemake.request_cache import RequestCache, shrink, stats, verify


def test_answers_are_scoped_and_sealed(tmp_path):
    folder = tmp_path / "requests"
    cache = RequestCache(folder, {"checkpoint": "tree:aaa", "dtype": "torch.float32"})
    key = cache.key("loglikelihood", [[1, 2, 3], [[4], [5, 6]]])
    assert cache.get(key) is None
    cache.put(key, [[-1.5, True], [-7.25, False]])
    assert cache.get(key) == [[-1.5, True], [-7.25, False]]
    assert (cache.hits, cache.misses) == (1, 1)
    other_weights = RequestCache(folder, {"checkpoint": "tree:aab", "dtype": "torch.float32"})
    assert other_weights.key("loglikelihood", [[1, 2, 3], [[4], [5, 6]]]) != key
    other_key = cache.key("loglikelihood", [[1, 2, 3], [[4], [5, 7]]])
    cache.put(other_key, [[-2.0, False], [-3.0, False]])
    cache.close()

    # a value moved under another key, or edited in place, reads as a miss
    with sqlite3.connect(folder / "cache.db") as db:
        rows = dict(db.execute("SELECT key, value FROM Cache").fetchall())
        db.execute("UPDATE Cache SET value = ? WHERE key = ?", (rows[other_key], key))
    cache = RequestCache(folder, {"checkpoint": "tree:aaa", "dtype": "torch.float32"})
    assert cache.get(key) is None and cache.get(other_key) == [[-2.0, False], [-3.0, False]]
    cache.close()
    assert verify(folder)["corrupt"] == 1
    assert stats(folder)[0] == 1


def test_unusable_folder_means_no_cache_not_an_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    said = []
    cache = RequestCache(blocker / "requests", {}, log=said.append)
    cache.put("k", [1])
    assert cache.get("k") is None and said and "unavailable" in said[0]


def test_shrink_evicts_least_recently_used_first(tmp_path):
    folder = tmp_path / "requests"
    cache = RequestCache(folder, {})
    keys = [cache.key("generate", n) for n in range(200)]
    for key in keys:
        cache.put(key, ["x" * 2000])
    for key in keys[:20]:
        assert cache.get(key)  # used again: the newest
    cache.close()
    entries, size = stats(folder)
    assert entries == 200
    evicted = shrink(folder, size // 2)
    assert 0 < evicted < 200 and stats(folder)[1] <= size // 2
    cache = RequestCache(folder, {})
    assert all(cache.get(key) for key in keys[:20])
    assert cache.get(keys[20]) is None
    cache.close()
    assert shrink(folder, 0) == 200 - evicted and not folder.exists()
