"""How training batches are drawn from a rank's store rows (no Ray: the rows are plain dicts)."""

import numpy as np
import pytest

from components.train.data import SHUFFLE_WINDOW_BATCHES, micro_batches


def _rows(n: int, block: int):
    # file order as the store keeps it: runs of `block` records of one template (one length)
    for i in range(n):
        length = 5 + (i // block) % 4
        yield {"idx": i, "id": str(i), "input_ids": list(range(length)), "labels": list(range(length)),
               "num_images": 0, "images": b"", "image_shape": []}


def _draw(group_by_length=True, seed=0, epoch=0, n=200, batch=8, micro=24, group_batches=2):
    return list(micro_batches(_rows(n, block=32), n, micro, batch, seed, epoch, group_by_length, group_batches))


def test_every_used_row_once_and_exactly_the_planned_steps():
    batches = _draw()
    assert len(batches) == 24 and all(len(b) == 8 for b in batches)
    idx = [s.idx for b in batches for s in b]
    assert sorted(idx) == list(range(24 * 8))  # rows past micro_steps x batch are read but not used


def test_a_stream_of_other_than_the_planned_rows_is_an_error():
    # the rank's stream is read to its end: it must hold exactly the rows the plan gave the rank
    for n in (199, 201):
        with pytest.raises(ValueError, match=f"stream held {n} rows, the plan 200"):
            list(micro_batches(_rows(n, block=32), 200, 24, 8, 0, 0, True))
    assert len(list(micro_batches(_rows(192, block=32), 192, 24, 8, 0, 0, True))) == 24


def test_order_is_a_function_of_seed_and_epoch():
    ids = lambda bs: [[s.idx for s in b] for b in bs]  # noqa: E731
    assert ids(_draw(seed=1, epoch=2)) == ids(_draw(seed=1, epoch=2))
    assert ids(_draw(seed=1, epoch=2)) != ids(_draw(seed=1, epoch=3))
    assert ids(_draw(seed=1, epoch=2)) != ids(_draw(seed=2, epoch=2))


def test_batches_are_random_draws_not_one_template_each():
    # with a window sorted by length, each batch would hold one length (one question template)
    batches = _draw(group_by_length=True)
    mixed = [len({len(s.input_ids) for s in b}) > 1 for b in batches]
    assert sum(mixed) >= len(batches) // 2
    spans = [max(s.idx for s in b) - min(s.idx for s in b) for b in batches]
    assert np.median(spans) > 4 * 8  # drawn from across the shuffle window, not neighbours in the file


def test_length_grouping_sorts_within_each_megabatch():
    for group_batches in (1, 2, 3):
        batches = _draw(group_batches=group_batches, n=SHUFFLE_WINDOW_BATCHES * 8, micro=SHUFFLE_WINDOW_BATCHES)
        flat = [len(s.input_ids) for b in batches for s in b]
        mega = 8 * group_batches
        for i in range(0, len(flat), mega):
            assert flat[i: i + mega] == sorted(flat[i: i + mega], reverse=True)
    unsorted = [len(s.input_ids) for b in _draw(group_by_length=False) for s in b]
    assert unsorted[:16] != sorted(unsorted[:16], reverse=True)
