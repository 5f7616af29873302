import numpy as np

from alignpipe.lm.batching import pad, pad_torch


def test_pad_right_and_left_by_hand():
    ids, mask = pad([[1, 2, 3], [4]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [4, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    ids, mask = pad([[1, 2, 3], [4]], pad_id=9, side="left")
    assert ids.tolist() == [[1, 2, 3], [9, 9, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_pad_min_width_and_torch():
    ids, mask = pad_torch([[5]], pad_id=0, min_width=2)
    assert ids.tolist() == [[5, 0]] and mask.tolist() == [[1, 0]] and str(ids.dtype) == "torch.int64"
    assert pad([], 0)[0].shape == (0, 0) and pad([[1]], 0)[0].dtype == np.int64
