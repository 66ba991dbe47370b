"""The visual projector's grid pooling and the image / object ids of the visual tokens."""

import pytest
import torch

from vlpet_cli.vl.projector import pool_grid, visual_ids


def test_pool_grid_is_adaptive_max_pooling_of_the_square_grid():
    feats = torch.arange(2 * 1 * 49 * 3, dtype=torch.float).reshape(2, 1, 49, 3)
    pooled = pool_grid(feats, 36)
    assert pooled.shape == (2, 1, 36, 3)
    grid = feats[0, 0].reshape(7, 7, 3)
    # 7 -> 6 adaptive windows: output cell (i, j) covers rows i..i+1 and columns j..j+1
    assert torch.equal(pooled[0, 0].reshape(6, 6, 3)[2, 3], grid[2:4, 3:5].amax((0, 1)))
    assert pool_grid(feats, 49) is feats
    assert pool_grid(feats, 40).shape == (2, 1, 36, 3)  # s = floor(sqrt(n_boxes))
    with pytest.raises(ValueError, match="not a square grid"):
        pool_grid(torch.zeros(1, 1, 50, 3), 36)


def test_visual_ids_number_images_and_objects():
    img, obj = visual_ids(2, 3, "cpu")
    assert img.tolist() == [0, 0, 0, 1, 1, 1]
    assert obj.tolist() == [0, 1, 2, 0, 1, 2]
