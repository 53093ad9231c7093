"""diffusion_jax.data.synthetic: the test-only dataset, served through data.GENERATED like a stored one."""

from __future__ import annotations

import numpy as np
import pytest

from diffusion_jax import data


def test_synthetic_is_served_like_a_stored_dataset():
    from diffusion_jax.data import synthetic

    geometry = ((8, 8, 1), 3)
    data.check_name("synthetic")
    info = data.info("synthetic", geometry=geometry)
    assert info.image_shape == (8, 8, 1) and info.num_classes == 3 and info.splits == synthetic.SPLIT_SIZES
    images, labels = data.load_arrays("synthetic", "test", geometry=geometry, seed=0)
    assert images.dtype == np.uint8 and images.shape == (1000, 8, 8, 1) and labels.dtype == np.int32
    assert set(np.unique(labels)) <= {0, 1, 2}
    again, _ = data.load_arrays("synthetic", "test", geometry=geometry, seed=0)
    np.testing.assert_array_equal(images, again)  # a pure function of the seed
    it = data.make_iterator("synthetic", "train", batch_size=4, seed=0, geometry=geometry,
                            process_index=0, process_count=1)
    batch = next(it)
    assert batch["image"].shape == (4, 8, 8, 1) and batch["image"].dtype == np.float32
    with pytest.raises(ValueError, match="geometry"):
        data.info("synthetic")
