"""Without a GPU, Triton kernels run in its CPU interpreter. The flag is read when a kernel is
defined (at import of ecospa_deploy.engine), so it is set here, before any test module loads."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
