import pytest


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
