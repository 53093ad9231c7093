"""Labels outside [0, num_classes) are refused when a dataset is loaded."""

import numpy as np
import pytest

from diffusion_jax import data


def _toy(tmp_path, labels, num_classes=3):
    images = np.zeros((len(labels), 4, 4, 1), np.uint8)
    data.write_arrays("toy", {"train": (images, np.asarray(labels, np.int32))},
                      num_classes=num_classes, data_dir=tmp_path)


@pytest.mark.parametrize("labels,bad", [([0, 1, 3, 2], "max 3"), ([0, -1, 2, 2], "min -1")],
                         ids=["null_label", "negative"])
def test_out_of_range_labels_are_refused(tmp_path, labels, bad):
    _toy(tmp_path, labels)
    for load in (lambda: data.make_iterator("toy", "train", batch_size=2, seed=0, data_dir=tmp_path,
                                            process_index=0, process_count=1),
                 lambda: data.data_source("toy", "train", data_dir=tmp_path)):
        with pytest.raises(data.DatasetError) as e:
            load()
        text = str(e.value)
        assert "1 label(s) outside [0, 3)" in text and bad in text and "prepare toy" in text
        assert "\n" not in text


def test_labels_in_range_load(tmp_path):
    _toy(tmp_path, [0, 1, 2, 2])
    it = data.make_iterator("toy", "train", batch_size=4, seed=0, shuffle=False, data_dir=tmp_path,
                            process_index=0, process_count=1)
    np.testing.assert_array_equal(next(it)["label"], [0, 1, 2, 2])
