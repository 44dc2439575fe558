"""Tokenization: the shared prompt/completion convention, prompt masking, truncation.

Tokenizers are built offline here: a byte-level BPE trained on three sentences (exact
round trips), and a word-level one where each word is one token, so truncation can be
checked with token counts worked by hand.
"""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from kilter.data.collate import pad_batch
from kilter.data.readers import read_records
from kilter.data.tokenize import (
    IGNORE_INDEX,
    PROMPT_SEP,
    encode_completions,
    encode_pair,
    encode_prompt,
    encode_prompt_completion,
    encode_sft_records,
    encode_text,
    render_prompt,
)
from kilter.errors import DataError

SPECIALS = ["<|pad|>", "<|eos|>", "<|bos|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
PAD, EOS, BOS, USER, ASSISTANT = 0, 1, 2, 3, 4
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
WORDS = [f"w{i}" for i in range(12)] + [f"c{i}" for i in range(12)] + ["hi"]


def wrap(core: Tokenizer, **extra) -> PreTrainedTokenizerFast:
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|eos|>", pad_token="<|pad|>", **extra)
    tok.chat_template = CHAT_TEMPLATE
    return tok


@pytest.fixture(scope="module")
def bpe():
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(["the cat sat on the mat", "hello world, how are you?", "a dog ran in the park"], trainer)
    return wrap(core)


def word_core() -> Tokenizer:
    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS + ["<unk>"])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()  # PROMPT_SEP "\n" vanishes: 1 word = 1 token
    core.add_special_tokens(SPECIALS)  # so chat markup splits into its marker tokens
    return core


@pytest.fixture(scope="module")
def words():
    return wrap(word_core())


@pytest.fixture(scope="module")
def words_bos():
    core = word_core()
    core.post_processor = processors.TemplateProcessing(single="<|bos|> $A", special_tokens=[("<|bos|>", BOS)])
    return wrap(core, bos_token="<|bos|>")


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def prompt_words(n: int) -> str:
    return " ".join(f"w{i}" for i in range(n))


def completion_words(n: int) -> str:
    return " ".join(f"c{i}" for i in range(n))


# --------------------------------------------------------------------------- rendering


def test_render_prompt_plain_and_chat(bpe):
    assert PROMPT_SEP == "\n"
    assert render_prompt(bpe, "Say hi") == "Say hi\n"
    messages = [{"role": "system", "content": "be kind"}, {"role": "user", "content": "hi"}]
    assert render_prompt(bpe, messages) == "<|system|>be kind<|end|><|user|>hi<|end|><|assistant|>"


def test_conversational_records_need_a_chat_template():
    core = word_core()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|eos|>", pad_token="<|pad|>")
    with pytest.raises(DataError, match="conversational records \\(message lists\\) need a tokenizer with a chat template"):
        render_prompt(tok, [{"role": "user", "content": "hi"}])
    assert render_prompt(tok, "plain is fine") == "plain is fine\n"


# --------------------------------------------------------------------------- masking


def test_prompt_tokens_are_masked_and_eos_is_a_label(bpe):
    assert bpe.pad_token_id == PAD and bpe.eos_token_id == EOS and PAD != EOS
    ex = encode_prompt_completion(bpe, "the cat sat", "on the mat", max_length=64)
    prompt_ids = ids(bpe, "the cat sat\n")
    completion_ids = ids(bpe, "on the mat")
    assert ex["input_ids"] == prompt_ids + completion_ids + [EOS]
    assert ex["labels"] == [IGNORE_INDEX] * len(prompt_ids) + completion_ids + [EOS]
    assert ex["prompt_len"] == len(prompt_ids)
    # the boundary is exact: decoding each part gives back each text
    assert bpe.decode(ex["input_ids"][: ex["prompt_len"]]) == "the cat sat\n"
    assert bpe.decode(ex["input_ids"][ex["prompt_len"] :]) == "on the mat<|eos|>"
    # generation sees exactly the prompt ids the model was trained on
    assert encode_prompt(bpe, "the cat sat", 64) == prompt_ids


def test_chat_prompt_masking(bpe):
    prompt = [{"role": "user", "content": "hi cat"}]
    ex = encode_prompt_completion(bpe, prompt, [{"role": "assistant", "content": "hello"}], max_length=64)
    n = ex["prompt_len"]
    assert ex["input_ids"][:n] == ids(bpe, "<|user|>hi cat<|end|><|assistant|>")
    assert ex["input_ids"][0] == USER and ex["input_ids"][n - 1] == ASSISTANT
    assert ex["labels"][:n] == [IGNORE_INDEX] * n
    assert ex["labels"][n:] == ex["input_ids"][n:] == ids(bpe, "hello") + [EOS]
    assert encode_prompt(bpe, prompt, 64) == ex["input_ids"][:n]


# --------------------------------------------------------------------------- truncation


def test_word_tokenizer_counts(words):
    assert ids(words, prompt_words(10) + "\n") == [7 + i for i in range(10)]  # w0..w9 -> ids 7..16
    assert len(ids(words, completion_words(3))) == 3


def test_no_truncation_when_it_fits(words):
    ex = encode_prompt_completion(words, prompt_words(10), completion_words(3), max_length=14)
    assert len(ex["input_ids"]) == 14 and ex["prompt_len"] == 10 and ex["input_ids"][-1] == EOS


def test_prompt_is_cut_from_the_left_first(words):
    # P=10, completion 3 words + EOS = 4, L=12: prompt keeps 12 - 4 = 8 (>= floor min(10, 6))
    ex = encode_prompt_completion(words, prompt_words(10), completion_words(3), max_length=12)
    assert ex["prompt_len"] == 8
    assert ex["input_ids"][:8] == ids(words, "w2 w3 w4 w5 w6 w7 w8 w9")
    assert ex["input_ids"][8:] == ids(words, "c0 c1 c2") + [EOS]
    assert ex["labels"] == [IGNORE_INDEX] * 8 + ids(words, "c0 c1 c2") + [EOS]


def test_prompt_cut_from_the_right_when_asked(words):
    ex = encode_prompt_completion(words, prompt_words(10), completion_words(3), 12, truncation_side="right")
    assert ex["input_ids"][:8] == ids(words, "w0 w1 w2 w3 w4 w5 w6 w7")


def test_long_completion_keeps_half_the_prompt_and_loses_eos(words):
    # P=10, completion 10 + EOS = 11, L=12: prompt floor min(10, 12 // 2) = 6; completion gets 6
    ex = encode_prompt_completion(words, prompt_words(10), completion_words(10), max_length=12)
    assert ex["prompt_len"] == 6
    assert ex["input_ids"] == ids(words, "w4 w5 w6 w7 w8 w9 c0 c1 c2 c3 c4 c5")
    assert EOS not in ex["input_ids"]
    assert ex["labels"] == [IGNORE_INDEX] * 6 + ids(words, "c0 c1 c2 c3 c4 c5")


def test_bos_is_prepended_to_plain_prompts_and_survives_truncation(words_bos):
    assert words_bos("w0")["input_ids"] == [BOS, 7]  # the tokenizer adds BOS by default
    ex = encode_prompt_completion(words_bos, prompt_words(3), completion_words(2), max_length=32)
    assert ex["input_ids"] == [BOS] + ids(words_bos, "w0 w1 w2 c0 c1") + [EOS]
    assert ex["prompt_len"] == 4
    # P = 1 + 10, completion 3 + EOS, L=12: prompt budget 8 = BOS + last 7 words
    cut = encode_prompt_completion(words_bos, prompt_words(10), completion_words(3), max_length=12)
    assert cut["input_ids"][:8] == [BOS] + ids(words_bos, "w3 w4 w5 w6 w7 w8 w9")
    assert encode_prompt(words_bos, prompt_words(10), 5) == [BOS] + ids(words_bos, "w6 w7 w8 w9")
    # chat templates write their own special tokens: no BOS added
    chat = encode_prompt(words_bos, [{"role": "user", "content": "hi"}], 32)
    assert chat == [USER] + ids(words_bos, "hi") + [6, ASSISTANT]


def test_max_length_too_small(words):
    with pytest.raises(Exception, match="max_length must be at least 2"):
        encode_prompt_completion(words, "w0", "c0", max_length=1)


# --------------------------------------------------------------------------- pairs, K responses, text


def test_encode_pair_shares_the_prompt(words):
    # P=10, chosen 2+EOS=3, rejected 9+EOS=10, L=14: budget max(min(10, 7), 14 - 10) = 7
    pair = encode_pair(words, prompt_words(10), completion_words(2), completion_words(9), max_length=14)
    chosen, rejected = pair["chosen"], pair["rejected"]
    assert chosen["prompt_len"] == rejected["prompt_len"] == 7
    assert chosen["input_ids"][:7] == rejected["input_ids"][:7] == ids(words, "w3 w4 w5 w6 w7 w8 w9")
    assert chosen["input_ids"][7:] == ids(words, "c0 c1") + [EOS]
    assert rejected["input_ids"][7:] == ids(words, "c0 c1 c2 c3 c4 c5 c6")  # cut to 7: no EOS
    assert len(rejected["input_ids"]) == 14


def test_encode_completions_for_k_responses(words):
    out = encode_completions(words, "w0 w1", ["c0", "c1 c2", "c3 c4 c5"], max_length=16)
    assert [o["input_ids"] for o in out] == [
        ids(words, "w0 w1 c0") + [EOS],
        ids(words, "w0 w1 c1 c2") + [EOS],
        ids(words, "w0 w1 c3 c4 c5") + [EOS],
    ]
    assert all(o["labels"][:2] == [IGNORE_INDEX] * 2 for o in out)


def test_encode_text_and_sft_records(words_bos):
    text = encode_text(words_bos, "w0 w1 w2", max_length=16)
    assert text["input_ids"] == text["labels"] == [BOS, 7, 8, 9, EOS]
    assert encode_text(words_bos, "w0 w1 w2", max_length=3)["input_ids"] == [BOS, 7, 8]
    encoded = encode_sft_records(words_bos, [{"text": "w0"}, {"prompt": "w1", "completion": "c0"}], max_length=16)
    assert encoded[0]["input_ids"] == [BOS, 7, EOS]
    assert encoded[1]["input_ids"] == [BOS, 8] + ids(words_bos, "c0") + [EOS]
    assert encoded[1]["labels"] == [IGNORE_INDEX, IGNORE_INDEX] + ids(words_bos, "c0") + [EOS]


def test_records_from_a_file_to_a_padded_batch(bpe, tmp_path):
    rows = [
        {"prompt": "the cat", "completion": "sat on the mat"},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello world"}]},
    ]
    path = tmp_path / "demos.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples = encode_sft_records(bpe, read_records(path, "demonstration"), max_length=64)
    batch = pad_batch(examples, pad_id=bpe.pad_token_id)
    lengths = [len(e["input_ids"]) for e in examples]
    assert batch["input_ids"].shape == (2, max(lengths))
    for row, n in enumerate(lengths):
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (max(lengths) - n)
        assert batch["input_ids"][row, n - 1].item() == EOS and batch["labels"][row, n - 1].item() == EOS
        assert batch["input_ids"][row, n:].tolist() == [PAD] * (max(lengths) - n)
        assert batch["labels"][row, n:].tolist() == [IGNORE_INDEX] * (max(lengths) - n)
        assert batch["labels"][row, : examples[row]["prompt_len"]].eq(IGNORE_INDEX).all()


# --------------------------------------------------------------------------- every assistant turn

END = SPECIALS.index("<|end|>")
CONVERSATION = [
    {"role": "user", "content": "w0 w1"},
    {"role": "assistant", "content": "c0 c1"},
    {"role": "user", "content": "w2"},
    {"role": "assistant", "content": "c2"},
]
GENERATION_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}<|assistant|>{% generation %}{{ m['content'] }}<|end|>"
    "{% endgeneration %}{% else %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def labelled(tok, example: dict) -> list[str]:
    return [tok.convert_ids_to_tokens(t) for t in example["labels"] if t != IGNORE_INDEX]


def test_all_assistant_labels_every_turn_and_its_end_marker(words):
    from kilter.data.tokenize import encode_conversation

    example = encode_conversation(words, CONVERSATION, 64)
    tokens = words.convert_ids_to_tokens(example["input_ids"])
    assert tokens == ["<|user|>", "w0", "w1", "<|end|>", "<|assistant|>", "c0", "c1", "<|end|>",
                      "<|user|>", "w2", "<|end|>", "<|assistant|>", "c2", "<|end|>", "<|eos|>"]
    # both assistant turns with the template's end-of-turn marker, then EOS after the last one
    assert labelled(words, example) == ["c0", "c1", "<|end|>", "c2", "<|end|>", "<|eos|>"]
    assert example["prompt_len"] == 5


def test_generation_markers_of_the_template_are_used(words):
    from kilter.data.tokenize import encode_conversation

    tok = wrap(word_core())
    tok.chat_template = GENERATION_TEMPLATE
    example = encode_conversation(tok, CONVERSATION, 64)
    # the template marks content + <|end|>, not the <|assistant|> header
    assert labelled(tok, example) == ["c0", "c1", "<|end|>", "c2", "<|end|>", "<|eos|>"]
    assert tok.convert_ids_to_tokens(example["input_ids"])[4] == "<|assistant|>"


def test_train_on_last_and_all_assistant_through_sft_records(words, tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": CONVERSATION}) + "\n")
    records = read_records(path, "demonstration").rows
    last = encode_sft_records(words, records, 64, train_on="last")[0]
    every = encode_sft_records(words, records, 64, train_on="all_assistant")[0]
    assert labelled(words, last) == ["c2", "<|eos|>"]
    assert labelled(words, every) == ["c0", "c1", "<|end|>", "c2", "<|end|>", "<|eos|>"]
    # a single-turn record is encoded the same either way
    single = [{"prompt": "w0", "completion": "c0"}]
    assert encode_sft_records(words, single, 64, train_on="all_assistant") == encode_sft_records(words, single, 64)
    # cut from the right: the last turn loses its tail and its EOS
    short = encode_sft_records(words, records, 7, train_on="all_assistant")[0]
    assert labelled(words, short) == ["c0", "c1"]


def test_template_that_rewrites_earlier_turns_is_a_one_line_error(words):
    from kilter.data.tokenize import encode_conversation

    tok = wrap(word_core())
    # drops earlier assistant turns from the history (as reasoning templates do), so turns do not nest
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}<|{{ m['role'] }}|>{{ m['content'] }}"
        "<|end|>{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    with pytest.raises(DataError, match="does not render the conversation turn by turn .*use data.train_on=last"):
        encode_conversation(tok, CONVERSATION, 64)




def test_smollm2_chat_template_trains_each_assistant_turn_with_its_im_end(smollm2_dir):
    from pathlib import Path

    from kilter.data.sources import load_records
    from kilter.models import load_tokenizer

    tok = load_tokenizer(str(smollm2_dir))
    fixture = Path(__file__).resolve().parents[2] / "fixtures" / "layouts" / "sharegpt.json"
    record = load_records(str(fixture), "demonstration")[0]
    example = encode_sft_records(tok, [record], 512, train_on="all_assistant")[0]
    trained = tok.decode([t for t in example["labels"] if t != IGNORE_INDEX])
    # ChatML: each turn ends with <|im_end|> (SmolLM2's EOS), so no extra EOS is added
    assert trained == ("The film was warm and lovely, I would go again.<|im_end|>\n"
                       "The film was bad.<|im_end|>\n")
    assert tok.eos_token == "<|im_end|>"
    last = encode_sft_records(tok, [record], 512, train_on="last")[0]
    assert tok.decode([t for t in last["labels"] if t != IGNORE_INDEX]) == "The film was bad.<|im_end|>"


@pytest.mark.parametrize("name,trained", [
    ("alpaca.json", "The film was warm and lovely, I would go again.<|eos|>"),
    ("ultrafeedback.jsonl", "The film was warm and lovely, I would go again.<|eos|>"),
    ("sharegpt.json", "The film was warm and lovely, I would go again.\nThe film was bad.\n<|eos|>"),
])
def test_each_sft_layout_fixture_trains_only_the_assistant_text(name, trained):
    from pathlib import Path

    from kilter.data.sources import load_records
    from kilter.models import load_tokenizer

    tok = load_tokenizer("builtin:tiny")
    fixture = Path(__file__).resolve().parents[2] / "fixtures" / "layouts" / name
    example = encode_sft_records(tok, load_records(str(fixture), "demonstration").rows[:1], 256, "all_assistant")[0]
    assert tok.decode([t for t in example["labels"] if t != IGNORE_INDEX]) == trained
    # and nothing of the user's side is learned
    assert "<|user|>" in tok.decode(example["input_ids"]) and "<|user|>" not in trained
