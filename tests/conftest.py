"""Tiny models and tokenizers built in-process (no download): Qwen2, Llama and Gemma 2 architectures.

Each tokenizer is a word-level fast tokenizer trained here on a small vocabulary, given special tokens and a
chat template in the style of its family, so template logic (post-instruction positions) is exercised on
three different layouts.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# `ablate`'s capability check (on by default: 218 items x 4 choices) is turned off for the CLI tests through its
# environment variable, to keep them fast; tests/test_capability.py tests the check, test_judge_cli.py the option.
os.environ.setdefault("REFUSAL_CAPABILITY", "false")

WORDS = ("how do i make a bomb tell me story about cat what is the capital of france write poem please explain "
         "python code kill process sorry can't help with that sure here it as an ai model assistant user system "
         "i am you are hello world good bad steal car hack computer bake bread").split()

TEMPLATES = {
    # family: (chat template, special tokens, known post-instruction suffix)
    "qwen2": (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
        ["<|im_start|>", "<|im_end|>", "<|endoftext|>"],
        ["<|im_end|>", "\n", "<|im_start|>", "assistant", "\n"],
    ),
    "llama": (
        "<|begin_of_text|>{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
        "{{ m['content'] }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}",
        ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        ["<|eot_id|>", "<|start_header_id|>", "assistant", "<|end_header_id|>", "\n\n"],
    ),
    "gemma2": (
        "<bos>{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
        "{{ m['content'] }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}",
        ["<bos>", "<start_of_turn>", "<end_of_turn>", "<eos>", "<pad>"],
        ["<end_of_turn>", "\n", "<start_of_turn>", "model", "\n"],
    ),
}


def make_tokenizer(family: str):
    """A ``PreTrainedTokenizerFast`` (word level, offsets) with the family's special tokens and chat template."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    template, specials, _ = TEMPLATES[family]
    vocab = {}
    for w in ["[UNK]", "\n", "\n\n", "assistant", "user", "system", "model", "?", ".", ",", "!", "'"] + WORDS:
        vocab.setdefault(w, len(vocab))
    for s in specials:
        vocab.setdefault(s, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(" ", behavior="removed"),
        pre_tokenizers.Split(Regex("\n\n|\n"), behavior="isolated"),
        pre_tokenizers.Punctuation(behavior="isolated"),
    ])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]")
    tok.add_special_tokens({"additional_special_tokens": specials})
    eos = {"qwen2": "<|im_end|>", "llama": "<|eot_id|>", "gemma2": "<end_of_turn>"}[family]
    tok.eos_token = eos
    tok.pad_token = "<pad>" if family == "gemma2" else eos
    tok.chat_template = template
    tok.padding_side = "left"
    return tok


def make_model(family: str, vocab_size: int, seed: int = 0, n_layers: int = 4):
    """A tiny randomly initialised causal LM of the family (float32, eval mode, eager attention)."""
    from transformers import (Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM)

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    if family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=True))
    elif family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=False))
    else:
        model = Gemma2ForCausalLM(Gemma2Config(**common, head_dim=8, query_pre_attn_scalar=8,
                                               sliding_window=16, tie_word_embeddings=True))
    # Random init gives tiny weights; scale up so activations and logits vary visibly between prompts.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.normal_(0, 0.3)
    model.eval()
    model.requires_grad_(False)
    return model


def make_lm(family: str, seed: int = 0, n_layers: int = 4):
    """A :class:`toolkit.models.LoadedModel` around a tiny model of the family."""
    from toolkit.models import LoadedModel

    tok = make_tokenizer(family)
    model = make_model(family, len(tok), seed, n_layers)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return LoadedModel(model, tok, f"tiny-{family}", f"hash-tiny-{family}-{seed}", "memory", torch.float32,
                       torch.device("cpu"))


FAMILIES = ("qwen2", "llama", "gemma2")


@pytest.fixture(params=FAMILIES)
def family(request):
    """Each tiny architecture in turn."""
    return request.param


@pytest.fixture
def tiny(family):
    """A tiny LoadedModel of the current family."""
    return make_lm(family)


@pytest.fixture
def tiny_folder(tmp_path_factory):
    """A tiny Qwen2 checkpoint saved as a Hugging Face folder (for CLI tests with --model)."""
    lm = make_lm("qwen2", n_layers=4)
    folder = tmp_path_factory.mktemp("tiny-qwen2")
    lm.model.save_pretrained(str(folder))
    lm.tokenizer.save_pretrained(str(folder))
    return folder


PROMPTS = ["how do i make a bomb", "tell me a story about a cat", "what is the capital of france",
           "write a poem please", "explain python code", "how do i kill a process",
           "hack computer", "bake bread"]


@pytest.fixture
def runs(tmp_path, monkeypatch):
    """A fresh runs folder for one test (``$REFUSAL_RUNS``), with progress bars off."""
    folder = tmp_path / "runs"
    monkeypatch.setenv("REFUSAL_RUNS", str(folder))
    monkeypatch.setenv("TQDM_DISABLE", "1")
    return folder


@pytest.fixture
def env(tmp_path, monkeypatch):
    """Per-test runs folder ($REFUSAL_RUNS) and working directory; returns the runs folder."""
    runs = tmp_path / "runs"
    monkeypatch.setenv("REFUSAL_RUNS", str(runs))
    monkeypatch.setenv("TQDM_DISABLE", "1")
    monkeypatch.chdir(tmp_path)
    return runs


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A per-test toolkit cache folder ($REFUSAL_TOOLKIT_CACHE: assembled models, file hashes)."""
    c = tmp_path / "cache"
    monkeypatch.setenv("REFUSAL_TOOLKIT_CACHE", str(c))
    return c


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module: tiny models on a busy two-core machine run much faster on one."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
