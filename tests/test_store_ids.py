"""The decoded store lists its ids from one `Split.ids` call (a property that builds the whole list), not one per
image: per image it was quadratic, about 16 s for PneumoniaMNIST's 4,708 train rows on every store load."""
from medclf.data import sources
from medclf.data.store import build_store


def test_a_store_builds_the_id_list_once(npz_file, monkeypatch, tmp_path):
    source = sources.open_source(npz_file)
    calls = []
    real = sources.Split.ids.fget
    monkeypatch.setattr(sources.Split, "ids", property(lambda split: calls.append(1) or real(split)))
    for cache in (False, True, True):  # decoded, written to the cache, read from the cache
        calls.clear()
        store, _ = build_store(source, "train", 16, 1, cache=cache, cache_dir=str(tmp_path / "c"))
        assert store.ids == [str(i) for i in range(len(source.splits["train"]))]
        assert len(calls) <= 2, len(calls)
