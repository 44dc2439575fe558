import pytest
import torch


@pytest.fixture(scope="session")
def micro_lm():
    """(tokenizer, model) of the untrained built-in micro model, in eval mode."""
    from kilter.models import load_causal_lm, load_tokenizer
    from kilter.models.tiny import builtin_model_dir

    path = str(builtin_model_dir("micro"))
    tokenizer = load_tokenizer(path)
    model = load_causal_lm(path, tokenizer)
    model.eval()
    return tokenizer, model


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread: OpenMP barriers cost more than they save."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
