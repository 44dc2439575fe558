"""A tiny Llama-style model and a BPE tokenizer trained on the built-in task's own text.

Nothing is downloaded: the tokenizer is trained with ``tokenizers`` on text Kilter
generates, and the model is randomly initialised with a fixed seed.  The architecture is
the same family as SmolLM2 (Llama), so the tiny model exercises the code paths that the
real preset uses.

``builtin:gpt2-micro|gpt2-tiny|gpt2-small`` are GPT-2 models with the same tokenizer, saved
the way a user's GPT-2 folder is: a ``GPT2TokenizerFast`` with no PAD token and no chat
template, a config without ``pad_token_id``, dropout 0.1.  They check that Kilter takes a
non-Llama folder as it comes, and they are the GPT-2 case of the benchmarks
(``gpt2-small``: about 3.5M parameters, the size of the issue-20 comparison with TRL).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from kilter.errors import KilterError
from kilter.runs import save_folder_atomically

SPECIAL_TOKENS = ["<|pad|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>"]

# A minimal chat template: each turn is "<|role|>content\n"; the generation prompt opens an
# assistant turn.  The completion is then followed by <|eos|> (added by the trainers).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

SIZES = {
    # name: (hidden, layers, heads, intermediate)
    "tiny": (128, 4, 4, 384),
    "micro": (64, 2, 2, 192),
    "small": (256, 6, 8, 768),
}

GPT2_SIZES = {
    # name: (n_embd, n_layer, n_head)
    "gpt2-micro": (64, 2, 2),
    "gpt2-tiny": (128, 4, 4),
    "gpt2-small": (256, 4, 4),
}


def cache_dir() -> Path:
    root = os.environ.get("KILTER_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "kilter")
    return Path(root)


def train_tokenizer(texts, vocab_size: int = 1024):
    """Byte-level BPE trained on ``texts``; PAD and EOS are distinct special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|pad|>",
        eos_token="<|eos|>",
        additional_special_tokens=SPECIAL_TOKENS[2:],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 512
    return fast


def build_model(tokenizer, size: str = "tiny", max_positions: int = 512, seed: int = 0):
    """A randomly initialised LlamaForCausalLM sized for CPU tests (about 1M parameters for 'tiny')."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, heads, inter = SIZES[size]
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_positions,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
        attention_dropout=0.0,
    )
    gen = torch.random.fork_rng()
    with gen:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def build_gpt2(tokenizer, size: str = "gpt2-tiny", max_positions: int = 512, seed: int = 0):
    """A randomly initialised GPT2LMHeadModel with GPT-2's own defaults (dropout 0.1, tied head)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    embd, layers, heads = GPT2_SIZES[size]
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=embd, n_layer=layers, n_head=heads,
                        n_positions=max_positions, bos_token_id=tokenizer.eos_token_id,
                        eos_token_id=tokenizer.eos_token_id)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return GPT2LMHeadModel(config)


def gpt2_tokenizer(tokenizer):
    """The built-in BPE as a user's GPT-2 folder holds one: GPT2TokenizerFast, EOS = BOS = UNK, no PAD,
    no chat template."""
    import tempfile

    from transformers import GPT2TokenizerFast

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "tokenizer.json")
        tokenizer.backend_tokenizer.save(path)
        eos = tokenizer.eos_token
        tok = GPT2TokenizerFast(tokenizer_file=path, eos_token=eos, bos_token=eos, unk_token=eos)
    tok.model_max_length = 512
    return tok


def save_atomically(target: Path, write) -> Path:
    """Call ``write(tmpdir)`` and rename the folder into place; concurrent builders are safe."""
    return save_folder_atomically(target, write, keep_existing=True)


def builtin_model_dir(name: str = "tiny", seed: int = 0) -> Path:
    """Folder with the untrained built-in model + tokenizer (built once, then cached)."""
    size = name or "tiny"
    if size not in SIZES and size not in GPT2_SIZES:
        raise KilterError(f"unknown built-in model {name!r}; choose one of "
                          + ", ".join(f"builtin:{n}" for n in [*SIZES, *GPT2_SIZES]))
    if size in GPT2_SIZES:
        target = cache_dir() / "models" / f"builtin-{size}-s{seed}-v2"
        if not (target / "config.json").is_file():
            def write_gpt2(tmp: Path) -> None:
                from transformers import AutoTokenizer

                tokenizer = gpt2_tokenizer(AutoTokenizer.from_pretrained(builtin_model_dir("micro", seed)))
                build_gpt2(tokenizer, size=size, seed=seed).save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)

            save_atomically(target, write_gpt2)
        return target
    target = cache_dir() / "models" / f"builtin-{size}-s{seed}-v4"
    if (target / "config.json").is_file():
        return target

    def write(tmp: Path) -> None:
        from kilter.data.task import build_task

        task = build_task(seed=seed)
        # Held-out prompts join the tokenizer's text (vocabulary only, no completions), so
        # held-out product names are whole tokens the model can copy from the prompt.
        tokenizer = train_tokenizer(task.corpus + task.eval_prompts)
        model = build_model(tokenizer, size=size, seed=seed)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return save_atomically(target, write)
