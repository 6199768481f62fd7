"""engine/staging.py on the CPU: plain copies with the values and dtypes asked for (the CUDA
side, that they do not wait for queued work, is in test_engine_gpu.py)."""

import torch

from ecospa_deploy.engine.staging import copy_in, to_device

CPU = torch.device("cpu")


def test_to_device_makes_ints_long_and_keeps_a_tensor_dtype():
    ids = to_device([3, 1, 2], CPU)
    assert ids.dtype == torch.long and ids.tolist() == [3, 1, 2]
    cu = to_device(torch.tensor([0, 4, 9], dtype=torch.int32), CPU)
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 4, 9]
    assert to_device([[1, 2]], CPU, torch.int32).shape == (1, 2)


def test_copy_in_fills_the_buffer_in_place():
    buf = torch.zeros(4, dtype=torch.long)
    ptr = buf.data_ptr()
    copy_in(buf, torch.tensor([1, 2, 3, 4]))
    assert buf.tolist() == [1, 2, 3, 4] and buf.data_ptr() == ptr
