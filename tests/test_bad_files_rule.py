"""The bad-file rule of a batch (pipelines/bad_files.py fill_batch): what every batch-building worker does with an
unreadable sample, on random batches."""

from __future__ import annotations

import random

from fastsupmae.pipelines.bad_files import MAX_REPLACEMENTS, BadImage, fill_batch, stand_in


def _loader(bad_set: set[int], placed: dict[int, int]):
    def load(pos: int, slot: int, sample: int, tries: int) -> None:
        if sample in bad_set:
            raise BadImage(f"/d/{sample}.jpg", "truncated")
        placed[pos] = sample
    return load


def test_training_replaces_evaluation_drops_strict_stops() -> None:
    rng = random.Random()
    n = rng.randrange(50, 500)
    seed, epoch, step = rng.randrange(1 << 30), rng.randrange(5), rng.randrange(100)
    idx = rng.sample(range(n), 16)
    bad_set = set(rng.sample(idx, 4))
    placed: dict[int, int] = {}
    bad: list[tuple[str, str]] = []
    kept, err = fill_batch(idx, _loader(bad_set, placed), strict=False, train=True, seed=seed, epoch=epoch, step=step,
                           n=n, bad=bad)
    assert err == "" and len(kept) == 16 and [placed[p] for p in range(16)] == kept
    assert all(k not in bad_set for k in kept) and len(bad) >= 4
    for j, i in enumerate(idx):  # a bad slot's stand-in is the deterministic draw (the first good one)
        if i not in bad_set:
            assert kept[j] == i
        else:
            t = 1
            while stand_in(seed, epoch, step, j, t, n) in bad_set:
                t += 1
            assert kept[j] == stand_in(seed, epoch, step, j, t, n)
    kept, err = fill_batch(idx, _loader(bad_set, {}), strict=False, train=False, seed=seed, epoch=epoch, step=step,
                           n=n, bad=[])
    assert err == "" and kept == [i for i in idx if i not in bad_set]
    first_bad = next(i for i in idx if i in bad_set)
    kept, err = fill_batch(idx, _loader(bad_set, {}), strict=True, train=True, seed=seed, epoch=epoch, step=step,
                           n=n, bad=bad)
    assert err == f"bad image file '/d/{first_bad}.jpg': truncated"


def test_a_dataset_without_a_readable_stand_in_stops_the_run() -> None:
    n = 40
    bad: list[tuple[str, str]] = []
    kept, err = fill_batch([3, 4], _loader(set(range(n)), {}), strict=False, train=True, seed=1, epoch=0, step=0,
                           n=n, bad=bad)
    assert kept == [] and f"{MAX_REPLACEMENTS + 1} bad image files in a row around" in err and "data.root" in err
    assert len(bad) == MAX_REPLACEMENTS + 1
