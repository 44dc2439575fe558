"""Rollout batches: layout by hand, and log-probs from one batched forward equal generate's own."""

import pytest
import torch

from kilter.rollout.generate import SamplingParams, cut_after_eos, hf_generate_kwargs, left_pad
from kilter.rollout.scoring import assemble, batched_logprobs, token_logprobs


def test_assemble_layout_by_hand():
    batch = assemble([[5, 6], [7]], [[8, 9, 1], [10]], pad_id=0)
    assert batch.prompt_width == 2
    assert batch.input_ids.tolist() == [[5, 6, 8, 9, 1], [0, 7, 10, 0, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [0, 1, 1, 0, 0]]
    # positions count real tokens only, so the left-padded row starts at 0 like generate did
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4], [0, 0, 1, 1, 1]]
    assert batch.response_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch.response_ids.tolist() == [[8, 9, 1], [10, 0, 0]]


def test_select_trims_padding_columns_only():
    batch = assemble([[5, 6, 7], [4]], [[8, 9, 1], [10]], pad_id=0)
    sub = batch.select([1])
    # row 1 alone: two leading pad columns go, but column P - 1 (its prompt token) stays; one response column
    assert sub.input_ids.tolist() == [[4, 10]]
    assert sub.prompt_width == 1 and sub.response_mask.tolist() == [[1.0]]
    assert sub.position_ids.tolist() == [[0, 1]]
    untrimmed = batch.select([1], trim=False)
    assert untrimmed.input_ids.shape == (1, 6)


def test_empty_response_has_an_empty_mask():
    batch = assemble([[5], [6]], [[], [7]], pad_id=0)
    assert batch.response_mask.tolist() == [[0.0], [1.0]]


def test_batched_logprobs_equal_the_sampling_distribution(micro_lm):
    """log pi at the sampling temperature, recomputed in one forward, matches generate's logits."""
    tok, model = micro_lm
    temperature = 0.7
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    ids, mask = left_pad(prompts, tok.pad_token_id, "cpu")
    torch.manual_seed(0)
    out = model.generate(input_ids=ids, attention_mask=mask, output_scores=True, return_dict_in_generate=True,
                         **hf_generate_kwargs(SamplingParams(max_new_tokens=7, temperature=temperature),
                                              tok.pad_token_id, tok.eos_token_id))
    new = out.sequences[:, ids.shape[1]:]
    responses = [cut_after_eos(row, tok.eos_token_id, tok.pad_token_id)[0] for row in new.tolist()]
    expected = torch.zeros(len(prompts), new.shape[1])
    # out.scores are what generate sampled from: logits / temperature with PAD suppressed (-inf)
    assert all(bool(torch.isneginf(s[:, tok.pad_token_id]).all()) for s in out.scores)
    for t, scores in enumerate(out.scores):
        expected[:, t] = torch.log_softmax(scores, -1).gather(-1, new[:, t:t + 1]).squeeze(-1)

    batch = assemble(prompts, responses, tok.pad_token_id)
    logp, entropy = batched_logprobs(model, batch, temperature, batch_size=2, with_entropy=True)
    m = batch.response_mask
    width = m.shape[1]
    assert torch.allclose(logp * m, expected[:, :width] * m, atol=1e-4)
    assert (logp[m == 0] == 0).all()
    # the entropy is that of the same tempered distribution, at every response position
    first = torch.softmax(out.scores[0], -1)
    assert torch.allclose(entropy[:, 0], -torch.special.xlogy(first, first).sum(-1), atol=1e-4)
    # one big batch, no trimming, with gradients: the same numbers
    with_grad, _ = token_logprobs(model, batch, temperature)
    assert torch.allclose(with_grad.detach() * m, logp, atol=1e-5)


@pytest.mark.parametrize("temperature", [0.5, 1.0])
def test_logprobs_depend_on_temperature(micro_lm, temperature):
    tok, model = micro_lm
    batch = assemble([[5, 6]], [[7, 8, 9]], tok.pad_token_id)
    logp, _ = batched_logprobs(model, batch, temperature, batch_size=4)
    logits = model(input_ids=batch.input_ids).logits[0, 1:4]
    logits[:, tok.pad_token_id] = -torch.inf  # the scored distribution excludes PAD, as sampling does
    manual = torch.log_softmax(logits / temperature, -1).gather(-1, torch.tensor([[7], [8], [9]])).squeeze(-1)
    assert torch.allclose(logp[0], manual, atol=1e-5)
