"""Canary tests: the behaviours of transformers, safetensors, gguf and torch that the engine relies on.

The engine (``toolkit/models.py``, ``toolkit/runner.py``) builds on a handful of library behaviours that are not
part of its own code and that a dependency upgrade can change silently: how ``save_pretrained`` writes dtypes, how
a GGUF file is turned into a float model (and whether the toolkit's dequantized cache can be saved again), the
``DynamicCache`` API used to share a prompt prefix, ``logits_to_keep``, what ``generate`` returns with
``output_logits=True``, and ``get_decoder()`` + ``get_output_embeddings()`` reproducing the model's logits.

Each test pins one of them on a tiny in-process model (``tests/conftest.py``; float32, CPU, transformers' default
attention, which is sdpa in 5.x) with exact expectations, and its assertion messages name the library and the
behaviour. If one of these fails after a dependency upgrade, the engine's assumption named in that test's message
broke: check the pinned versions (``constraints.txt``) and the code path named in the message before relaxing the
test. A strict xfail documents a known quirk of the installed version; its XPASS means that quirk is gone.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch

from conftest import make_lm, make_model

pytestmark = pytest.mark.usefixtures("one_thread")

FULL_CACHE_FAMILIES = ("qwen2", "llama")  # the runner shares prefixes only without sliding windows (not Gemma 2)


def _ids(lm, texts):
    """Left-padded token ids and attention mask of chat-formatted prompts."""
    tok = lm.tokenizer
    rows = [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=False)
            for t in texts]
    enc = tok(rows, return_tensors="pt", padding=True, add_special_tokens=False)
    return enc["input_ids"], enc["attention_mask"]


def _last_logits_one_by_one(model, ids_list):
    """Last-position logits of each prompt from its own full pass, no cache, no padding: ``[n, vocab]``."""
    with torch.inference_mode():
        return torch.cat([model(input_ids=torch.tensor([x])).logits[:, -1] for x in ids_list])


# --------------------------------------------------------------------------------------------------- 1. saving
def test_save_pretrained_roundtrip_float32_and_bfloat16_dtype(tmp_path):
    """save_pretrained/from_pretrained reproduce float32 logits exactly and write the in-memory dtype (bf16 too)."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    lm = make_lm("qwen2")
    folder = tmp_path / "f32"
    lm.model.save_pretrained(str(folder), safe_serialization=True)
    lm.tokenizer.save_pretrained(str(folder))
    files = sorted(p.name for p in folder.glob("*.safetensors"))
    assert files, ("transformers save_pretrained(safe_serialization=True) wrote no .safetensors file: "
                   f"{sorted(p.name for p in folder.iterdir())}")

    loaded = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    loaded.eval()
    ids, mask = _ids(lm, ["how do i make a bomb", "tell me a story about a cat"])
    with torch.inference_mode():
        want = lm.model(input_ids=ids, attention_mask=mask).logits
        got = loaded(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(got, want), (
        "transformers save_pretrained -> from_pretrained(dtype=float32) no longer reproduces a float32 model's "
        f"logits exactly (max |diff| {float((got - want).abs().max()):.3g}); the toolkit's dequantized GGUF cache and "
        "folder loading assume a lossless round trip")
    sd = loaded.state_dict()
    for name, t in lm.model.state_dict().items():
        assert name in sd, f"transformers from_pretrained lost parameter {name} after save_pretrained"
        assert sd[name].dtype == t.dtype == torch.float32, (
            f"transformers from_pretrained(dtype=float32) gave {name} dtype {sd[name].dtype}, saved as {t.dtype}")
        assert torch.equal(sd[name], t), f"transformers save/load round trip changed parameter {name}"
    with safe_open(str(folder / files[0]), framework="pt") as f:
        stored = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert stored and set(stored.values()) == {"F32"}, (
        f"transformers save_pretrained of a float32 model wrote dtypes {set(stored.values())} (expected only F32)")

    bf_folder = tmp_path / "bf16"
    lm.model.to(torch.bfloat16).save_pretrained(str(bf_folder), safe_serialization=True)
    bf_files = sorted(bf_folder.glob("*.safetensors"))
    assert bf_files, "transformers save_pretrained wrote no .safetensors file for a bfloat16 model"
    with safe_open(str(bf_files[0]), framework="pt") as f:
        names = list(f.keys())
        stored = {k: f.get_slice(k).get_dtype() for k in names}
        t0 = f.get_tensor(names[0])
    assert set(stored.values()) == {"BF16"}, (
        "transformers save_pretrained no longer writes the dtype of the tensors in memory: a bfloat16 model was "
        f"saved with dtypes {set(stored.values())} (expected only BF16)")
    assert t0.dtype == torch.bfloat16, f"safetensors safe_open(framework='pt') read back {t0.dtype}, not bfloat16"


@pytest.mark.parametrize("config_family", [
    None,
    "llama",
    pytest.param("qwen2", marks=pytest.mark.xfail(strict=True, reason=(
        "transformers 5.24: AutoTokenizer.from_pretrained on a folder whose config.json has model_type qwen2 "
        "ignores tokenizer_config.json's tokenizer_class (TokenizersBackend) and tokenizer.json's pipeline "
        "('qwen2' is in MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS): it builds a byte-level BPE Qwen2Tokenizer "
        "from the vocabulary, so conftest's word-level tiny tokenizer loses most words. Harmless for real Qwen2 "
        "checkpoints; PreTrainedTokenizerFast.from_pretrained keeps the saved tokenizer. XPASS = fixed upstream."))),
])
def test_tokenizer_save_pretrained_roundtrip(tmp_path, config_family):
    """AutoTokenizer.from_pretrained(folder) gives the saved tokenizer's ids and chat template back."""
    from transformers import AutoTokenizer

    fam = config_family or "llama"
    lm = make_lm(fam)
    if config_family:
        lm.model.save_pretrained(str(tmp_path))
    lm.tokenizer.save_pretrained(str(tmp_path))
    tok2 = AutoTokenizer.from_pretrained(str(tmp_path))
    assert tok2.chat_template == lm.tokenizer.chat_template, "transformers tokenizer save/load lost the chat template"
    tok2.padding_side = "left"  # as toolkit.models.load_model sets it
    texts = ["how do i make a bomb", "tell me a story about a cat"]
    want, _ = _ids(lm, texts)
    got, _ = _ids(type(lm)(lm.model, tok2, "", "", "", torch.float32, torch.device("cpu")), texts)
    assert got.shape == want.shape and torch.equal(got, want), (
        f"transformers AutoTokenizer.from_pretrained of a saved tokenizer (folder config: {config_family}) gives "
        f"other ids ({type(tok2).__name__}): {got.tolist()} vs {want.tolist()}; toolkit.models._load_folder "
        "loads folders' tokenizers this way")


# ---------------------------------------------------------------------------------------------------- 2. GGUF
def _permute_for_gguf(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's q/k row permutation for Llama (what transformers' LlamaTensorProcessor undoes)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_tiny_gguf(path, family: str):
    """Write a float32 GGUF of a tiny ``family`` (qwen2 or llama) model with a byte-level BPE tokenizer.

    Returns the source model (same weights, same token ids).
    """
    import gguf
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_chars = bytes_to_unicode()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    merged = ["he", "ll", "Ġt"]
    tokens = [byte_chars[i] for i in range(256)] + merged + specials
    types = [int(gguf.TokenType.NORMAL)] * (len(tokens) - len(specials)) + [int(gguf.TokenType.CONTROL)] * len(specials)
    model = make_model(family, len(tokens))
    cfg = model.config
    arch = {"qwen2": gguf.MODEL_ARCH.QWEN2, "llama": gguf.MODEL_ARCH.LLAMA}[family]
    name_map = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)

    w = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    w.add_name(f"tiny-{family}")
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    if family == "llama":
        w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2" if family == "qwen2" else "llama-bpe")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(["h e", "l l", "Ġ t"])
    w.add_bos_token_id(tokens.index("<|endoftext|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_pad_token_id(tokens.index("<|endoftext|>"))
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # llama.cpp writes output.weight only when it is not the embedding matrix
        stem, suffix = name.rsplit(".", 1)
        gname = name_map.get_name(stem)
        assert gname, f"gguf.get_tensor_name_map({arch.name}) has no GGUF name for transformers' {name}"
        t = t.detach().float()
        if family == "llama" and name.endswith("q_proj.weight"):
            t = _permute_for_gguf(t, cfg.num_attention_heads)
        elif family == "llama" and name.endswith("k_proj.weight"):
            t = _permute_for_gguf(t, cfg.num_key_value_heads)
        w.add_tensor(f"{gname}.{suffix}", t.numpy().copy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """``{family: (path of a tiny float32 GGUF, the model it was written from)}`` for qwen2 and llama."""
    out = {}
    for fam in ("qwen2", "llama"):
        path = tmp_path_factory.mktemp(f"gguf-{fam}") / f"tiny-{fam}.gguf"
        out[fam] = (path, _write_tiny_gguf(path, fam))
    return out


GGUF_IDS = torch.tensor([[256, 5, 40, 100, 200, 258, 260, 261, 7, 259], [259, 104, 257, 111, 3, 90, 91, 92, 93, 94]])


@pytest.mark.parametrize("fam", ["qwen2", "llama"])
def test_gguf_f32_loads_with_same_logits(tiny_gguf, fam):
    """transformers loads a float32 GGUF (via gguf) to a model with the source's logits, and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, source = tiny_gguf[fam]
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    assert type(model) is type(source), f"transformers loaded a {fam} GGUF as {type(model).__name__}"
    assert model.config.tie_word_embeddings == source.config.tie_word_embeddings, (
        "transformers' GGUF loader no longer infers tie_word_embeddings from the absence of output.weight")
    with torch.inference_mode():
        want = source(input_ids=GGUF_IDS).logits
        got = model(input_ids=GGUF_IDS).logits
    assert got.dtype == torch.float32, f"transformers GGUF load with dtype=float32 computes in {got.dtype}"
    assert torch.allclose(got, want, atol=1e-5, rtol=0), (
        f"transformers from_pretrained(gguf_file=...) of a float32 {fam} GGUF gives other logits than the model it "
        f"was written from (max |diff| {float((got - want).abs().max()):.3g}); the toolkit's GGUF loading "
        "(toolkit.models._dequantize_gguf_to_cache) relies on an exact dequantization")
    q = getattr(model.config, "quantization_config", None)
    assert q is not None, ("transformers no longer attaches a quantization_config to a GGUF-loaded model's config; "
                           "toolkit.models strips it before caching and may now be dead code")

    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    assert len(tok) == source.config.vocab_size, (
        f"transformers GGUF tokenizer has {len(tok)} tokens, the file's model {source.config.vocab_size}")
    assert tok.eos_token == "<|im_end|>", f"transformers GGUF tokenizer eos is {tok.eos_token!r}, not the file's"
    assert tok("<|im_start|>hello")["input_ids"] == [260, 256, 257, 111], (
        "transformers GGUF byte-level tokenizer no longer keeps CONTROL tokens whole or applies the file's merges: "
        f"{tok('<|im_start|>hello')['input_ids']}")


def _toolkit_load(tiny_gguf, tmp_path, monkeypatch):
    from toolkit.models import load_model

    monkeypatch.setenv("REFUSAL_TOOLKIT_CACHE", str(tmp_path / "cache"))
    path, source = tiny_gguf["qwen2"]
    return load_model(str(path), dtype="float32", device="cpu"), source


def test_toolkit_load_model_gguf_same_logits(tiny_gguf, tmp_path, monkeypatch):
    """toolkit.models.load_model on a .gguf (dequantize, cache as safetensors, reload) keeps the source's logits."""
    lm, source = _toolkit_load(tiny_gguf, tmp_path, monkeypatch)
    assert lm.source.startswith(str(tmp_path / "cache")), f"the GGUF cache was not written under the cache: {lm.source}"
    with torch.inference_mode():
        want = source(input_ids=GGUF_IDS).logits
        got = lm.model(input_ids=GGUF_IDS).logits
    assert torch.allclose(got, want, atol=1e-5, rtol=0), (
        "toolkit.models.load_model(<gguf>) gives other logits than the model the GGUF was written from "
        f"(max |diff| {float((got - want).abs().max()):.3g}): GGUF -> transformers -> rebuilt model -> safetensors "
        "cache -> reload is no longer lossless")
    assert lm.tokenizer.eos_token == "<|im_end|>", f"the cached tokenizer's eos is {lm.tokenizer.eos_token!r}"


def test_toolkit_gguf_cache_config_has_no_quantization_config(tiny_gguf, tmp_path, monkeypatch):
    """The dequantized cache's config.json carries no (GGUF) quantization_config."""
    lm, _ = _toolkit_load(tiny_gguf, tmp_path, monkeypatch)
    cfg = json.loads((Path(lm.source) / "config.json").read_text())
    assert "quantization_config" not in cfg, (
        "the toolkit's dequantized GGUF cache config.json still has quantization_config "
        f"{cfg.get('quantization_config')}: transformers then refuses save_pretrained on the cached model "
        "('quantized with gguf and is not serializable') although its weights are plain float32")


def test_toolkit_gguf_loaded_model_can_be_saved(tiny_gguf, tmp_path, monkeypatch):
    """A model loaded by toolkit.models.load_model from a .gguf can be saved with save_pretrained."""
    lm, _ = _toolkit_load(tiny_gguf, tmp_path, monkeypatch)
    out = tmp_path / "resaved"
    lm.model.save_pretrained(str(out), safe_serialization=True)
    assert list(out.glob("*.safetensors")), "save_pretrained of a toolkit-loaded GGUF model wrote no safetensors"


# ------------------------------------------------------------------------------------------------ 3. caches
@pytest.mark.parametrize("fam", FULL_CACHE_FAMILIES)
def test_dynamic_cache_prefix_copy_repeat_matches_full_passes(fam):
    """A DynamicCache prefix, deep-copied and batch_repeat_interleave'd, gives the full passes' logits (runner)."""
    from transformers import DynamicCache

    lm = make_lm(fam)
    model = lm.model
    prefix = [5, 17, 23, 9, 40, 12]
    suffixes = [[30, 31, 32, 33], [44, 45], [50, 51, 52]]  # different lengths: left padding between prefix and rest
    n, p = len(suffixes), len(prefix)
    pad = lm.tokenizer.pad_token_id
    width = max(map(len, suffixes))
    ids = torch.tensor([[pad] * (width - len(s)) + s for s in suffixes])
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in suffixes])
    pos = (mask.cumsum(1) - 1).clamp(min=0) + p  # what Runner._inputs passes
    full_mask = torch.cat([torch.ones(n, p, dtype=mask.dtype), mask], 1)

    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        model(input_ids=torch.tensor([prefix]), past_key_values=cache, use_cache=True, logits_to_keep=1)
        assert cache.get_seq_length() == p, (
            f"transformers DynamicCache filled in place by a forward pass holds {cache.get_seq_length()} positions, "
            f"expected the prefix's {p} (Runner._prefix_cache relies on in-place filling)")
        c = copy.deepcopy(cache)
        c.batch_repeat_interleave(n)
        out = model(input_ids=ids, position_ids=pos, attention_mask=full_mask, past_key_values=c, use_cache=True)
        assert cache.get_seq_length() == p, (
            "transformers DynamicCache: running on a deep copy changed the original's sequence length "
            f"({cache.get_seq_length()} != {p}); Runner reuses one prefix cache for every batch")
        assert c.get_seq_length() == p + width, (
            f"the copied DynamicCache holds {c.get_seq_length()} positions after the suffix pass, not {p + width}: "
            "transformers may have stopped honouring past_key_values= (5.24 deprecates it for cache=, removal "
            "announced for 5.40.0); Runner and toolkit.patching pass past_key_values=")
        again = copy.deepcopy(cache)
        again.batch_repeat_interleave(n)
        out2 = model(input_ids=ids, position_ids=pos, attention_mask=full_mask, past_key_values=again, use_cache=True)
    want = _last_logits_one_by_one(model, [prefix + s for s in suffixes])
    got = out.logits[:, -1]
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-5, rtol=0), (
        f"transformers DynamicCache prefix + deepcopy + batch_repeat_interleave({n}) + left-padded suffixes no longer "
        f"reproduce full passes ({fam}, max |diff| {float((got - want).abs().max()):.3g}); Runner's prefix sharing "
        "(Runner._prefix_cache/_inputs) is then wrong")
    assert torch.equal(out2.logits, out.logits), "a second deep copy of the same prefix cache gave other logits"


@pytest.mark.parametrize("fam", FULL_CACHE_FAMILIES)
def test_cache_kwarg_equals_past_key_values(fam):
    """forward(cache=) (transformers 5.24's new name) equals forward(past_key_values=) (what the engine passes)."""
    from transformers import DynamicCache

    model = make_lm(fam).model
    prefix, suffix = torch.tensor([[5, 17, 23, 9, 40, 12]]), torch.tensor([[30, 31, 32]])
    got = {}
    with warnings.catch_warnings(record=True) as caught, torch.inference_mode():
        warnings.simplefilter("always")
        for kw in ("past_key_values", "cache"):
            c = DynamicCache(config=model.config)
            model(input_ids=prefix, use_cache=True, **{kw: c})
            got[kw] = model(input_ids=suffix, use_cache=True, **{kw: c}).logits
            assert c.get_seq_length() == 9, f"forward({kw}=DynamicCache) did not fill the cache in place ({fam})"
            h = model.get_decoder()(input_ids=suffix, use_cache=True, **{kw: copy.deepcopy(c)}).last_hidden_state
            assert h.shape[1] == 3
    assert torch.equal(got["cache"], got["past_key_values"]), (
        f"transformers forward(cache=) and forward(past_key_values=) give different logits ({fam})")
    dep = {str(w.message) for w in caught if issubclass(w.category, (DeprecationWarning, FutureWarning))}
    assert not [m for m in dep if "`cache`" in m and "deprecated" in m and "past_key_values" not in m], (
        f"transformers now deprecates the cache= keyword too: {dep}")


# -------------------------------------------------------------------------------------------- 4. logits_to_keep
@pytest.mark.parametrize("fam", ("qwen2", "llama", "gemma2"))
def test_logits_to_keep_returns_last_positions(fam):
    """forward(logits_to_keep=k) returns [batch, k, vocab], equal to the last k positions of the full logits."""
    lm = make_lm(fam)
    ids, mask = _ids(lm, ["how do i make a bomb", "bake bread"])
    with torch.inference_mode():
        full = lm.model(input_ids=ids, attention_mask=mask).logits
        for k in (1, 3):
            part = lm.model(input_ids=ids, attention_mask=mask, logits_to_keep=k).logits
            assert part.shape == (ids.shape[0], k, full.shape[-1]), (
                f"transformers forward(logits_to_keep={k}) returned logits of shape {tuple(part.shape)} ({fam}), "
                f"expected {(ids.shape[0], k, full.shape[-1])}")
            assert torch.allclose(part, full[:, -k:], atol=1e-5, rtol=0), (
                f"transformers forward(logits_to_keep={k}) logits differ from the last {k} positions of the full "
                f"logits ({fam}, max |diff| {float((part - full[:, -k:]).abs().max()):.3g})")


# ---------------------------------------------------------------------------------------------- 5. generate
def test_generate_output_logits_first_step_and_sequences():
    """generate(output_logits=True, return_dict_in_generate=True) gives raw per-step logits and prompt-led sequences."""
    lm = make_lm("qwen2")
    model, tok = lm.model, lm.tokenizer
    ids, mask = _ids(lm, ["how do i make a bomb", "tell me a story about a cat"])
    eos = model.generation_config.eos_token_id
    with warnings.catch_warnings(record=True) as caught, torch.inference_mode():
        warnings.simplefilter("always")
        res = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, temperature=None,
                             top_p=None, top_k=None, output_logits=True, return_dict_in_generate=True,
                             pad_token_id=tok.pad_token_id, eos_token_id=eos)
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        plain = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1]
    assert isinstance(res.logits, tuple) and len(res.logits) == 3, (
        "transformers generate(output_logits=True, max_new_tokens=3) no longer returns .logits as a tuple of 3 "
        f"steps: {type(res.logits).__name__} of length {len(res.logits) if res.logits is not None else None}")
    for step in res.logits:
        assert step.shape == (ids.shape[0], model.config.vocab_size), (
            f"transformers generate .logits step has shape {tuple(step.shape)}, expected [batch, vocab]")
    assert torch.allclose(res.logits[0].float(), plain, atol=1e-5, rtol=0), (
        "transformers generate .logits[0] differs from the last-position logits of a plain forward pass "
        f"(max |diff| {float((res.logits[0] - plain).abs().max()):.3g}); Runner.generate returns it as the "
        "prompt's next-token logits")
    width = ids.shape[1]
    assert res.sequences.shape == (ids.shape[0], width + 3), f"sequences shape {tuple(res.sequences.shape)}"
    assert torch.equal(res.sequences[:, :width], ids), (
        "transformers generate .sequences no longer start with the input ids (Runner.generate cuts them off by width)")
    new = res.sequences[:, width:]
    assert not (new[:, :2] == eos).any(), "test premise: no prompt ends before the last step"
    greedy = torch.stack([s.argmax(-1) for s in res.logits], 1)
    assert torch.equal(new, greedy), "transformers greedy generate tokens are not the argmax of its .logits"
    dep = [str(w.message) for w in caught if issubclass(w.category, (DeprecationWarning, FutureWarning))]
    assert not dep, f"transformers deprecates part of the generate call Runner.generate makes: {dep}"


# ---------------------------------------------------------------------------------- 6. decoder + output head
@pytest.mark.parametrize("fam", ("qwen2", "llama", "gemma2"))
def test_decoder_and_output_embeddings_reproduce_logits(fam):
    """get_decoder().last_hidden_state[:, -1] through get_output_embeddings() (Gemma 2: soft-capped) = logits."""
    lm = make_lm(fam)
    model = lm.model
    ids, mask = _ids(lm, ["how do i make a bomb", "bake bread"])
    cap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    assert (cap is not None) == (fam == "gemma2"), f"final_logit_softcapping is {cap!r} for {fam}"
    with torch.inference_mode():
        want = model(input_ids=ids, attention_mask=mask).logits[:, -1]
        decoder = model.get_decoder()
        assert decoder is not model and hasattr(decoder, "layers"), (
            f"transformers get_decoder() of {type(model).__name__} returned {type(decoder).__name__} without .layers "
            "(toolkit.hooks.decoder_layers looks there)")
        h = decoder(input_ids=ids, attention_mask=mask).last_hidden_state[:, -1]
        got = model.get_output_embeddings()(h)
        if cap:
            got = torch.tanh(got / cap) * cap
        if fam in FULL_CACHE_FAMILIES:  # with a prefix cache, as Runner._logits_from_context calls it
            from transformers import DynamicCache

            x = [5, 17, 23, 9, 40, 12, 30, 31]
            cache = DynamicCache(config=model.config)
            model(input_ids=torch.tensor([x[:-2]]), past_key_values=cache, use_cache=True)
            hc = decoder(input_ids=torch.tensor([x[-2:]]), past_key_values=copy.deepcopy(cache),
                         use_cache=True).last_hidden_state[:, -1]
            gc = model.get_output_embeddings()(hc)
            wc = model(input_ids=torch.tensor([x])).logits[:, -1]
            assert torch.allclose(gc, wc, atol=1e-5, rtol=0), (
                f"transformers get_decoder() with past_key_values + LM head differs from a full pass ({fam}, "
                f"max |diff| {float((gc - wc).abs().max()):.3g})")
    assert torch.allclose(got, want, atol=1e-5, rtol=0), (
        f"transformers get_decoder() final hidden state through get_output_embeddings()"
        f"{' with final_logit_softcapping' if cap else ''} no longer reproduces the model's last-position logits "
        f"({fam}, max |diff| {float((got - want).abs().max()):.3g}); Runner._head / Context.head_once rely on it")
