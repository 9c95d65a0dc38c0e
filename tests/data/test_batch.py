"""The batch contract: FIELDS, the Batch TypedDict and check_batch."""

from __future__ import annotations

import pytest
import torch

from depthdif_hpc.data.batch import FIELDS, Batch, check_batch


def _batch(b: int = 2, d: int = 5, h: int = 4, w: int = 3) -> dict[str, torch.Tensor]:
    sizes = {"B": b, "D": d, "H": h, "W": w}
    return {f.name: torch.zeros(tuple(x if isinstance(x, int) else sizes[x] for x in f.dims),
                                dtype=f.dtype) for f in FIELDS}


def test_typeddict_and_fields_declare_the_same_keys():
    assert Batch.__required_keys__ == {f.name for f in FIELDS if not f.optional}
    assert Batch.__optional_keys__ == {f.name for f in FIELDS if f.optional}
    assert all(f.dims[0] == "B" for f in FIELDS)


def test_a_conforming_batch_passes():
    b = _batch()
    check_batch(b, "test")
    del b["coords"]  # optional
    check_batch(b, "test", sizes={"D": 5, "H": 4, "W": 3})


def test_missing_and_unknown_keys_are_named():
    b = _batch()
    del b["y_valid_mask"]
    with pytest.raises(ValueError, match=r"batch from val loader .*missing key 'y_valid_mask'"):
        check_batch(b, "val loader")
    b = _batch()
    b["x_valid_mask_1d"] = torch.zeros(2, 1, 4, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"unknown key 'x_valid_mask_1d'"):
        check_batch(b, "test")


def test_wrong_shape_names_the_odd_key_out():
    b = _batch()
    b["eo"] = torch.zeros(2, 1, 4, 4)  # eo comes first: it must not set W for the others
    with pytest.raises(ValueError) as err:
        check_batch(b, "test")
    msg = str(err.value)
    assert "'eo' has shape (2, 1, 4, 4), expected (B, 1, H, W) = (2, 1, 4, 3)" in msg
    assert msg.count("has shape") == 1
    b = _batch()
    b["date"] = torch.zeros(3, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"'date' has shape \(3,\), expected \(B,\) = \(2,\)"):
        check_batch(b, "test")
    with pytest.raises(ValueError, match=r"'x' has shape \(2, 5, 4, 3\), expected "
                                         r"\(B, D, H, W\) = \(2, 50, 4, 3\)"):
        check_batch(_batch(), "test", sizes={"D": 50})


def test_wrong_dtype_and_non_tensor_are_named():
    b = _batch()
    b["x_valid_mask"] = b["x_valid_mask"].float()
    with pytest.raises(ValueError, match=r"'x_valid_mask' has dtype torch.float32, "
                                         r"expected torch.bool"):
        check_batch(b, "test")
    b = _batch()
    b["sample_id"] = [1, 2]
    with pytest.raises(ValueError, match=r"'sample_id' is a list, expected a torch.Tensor"):
        check_batch(b, "test")
