"""The ``nli`` judge (toolkit.judge_nli) on a tiny BERT NLI model built in-process (no download).

(a) verdicts equal a hand computation from plain forward passes, one (premise, hypothesis) row at a time;
(b) with the logits rigged by a forward hook (entailment decided by words of the response), known refusals,
    compliances and the empty answer get exact labels and probabilities; truncation keeps the hypothesis;
(c) batch size 1 and 8 agree; (d) non-NLI label sets are refused; (e) loading from a folder, missing folders and
uncached hub ids; (f) ``make_judge("nli", ...)``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from toolkit.errors import ToolkitError
from toolkit.judge_nli import NLI_HYPOTHESES, NLI_PREMISE, NLI_VERSION, NLIJudge, nli_label_indices
from toolkit.judges import LABELS, make_judge
from toolkit.models import _folder_hash

WORDS = ("request response the assistant refuses to help with helps is unrelated or nonsense sorry i can't "
         "that sure here it how do make a bomb bake bread tell me story about cat please write poem what capital "
         "of france hello world bother steps first mix flour water").split()

# Entailment is not class 0 here, so a judge that read column 0 would be caught.
ID2LABEL = {0: "CONTRADICTION", 1: "Neutral", 2: "ENTAILMENT"}


def make_nli_tokenizer():
    """A BERT-style word-level ``PreTrainedTokenizerFast``: lowercase, [CLS] A [SEP] B [SEP], type ids 0/1."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    vocab = {}
    for w in specials + [".", ",", ":", "'", "[", "]"] + WORDS:
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                pre_tokenizers.Punctuation(behavior="isolated")])
    tk.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                  sep_token="[SEP]", model_max_length=128,
                                  model_input_names=["input_ids", "token_type_ids", "attention_mask"])
    return tok


def make_nli_model(vocab_size: int, id2label=None, seed: int = 0):
    """A tiny randomly initialised BERT sequence classifier (float32, eval, 3 classes)."""
    from transformers import BertConfig, BertForSequenceClassification

    id2label = ID2LABEL if id2label is None else id2label
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128, num_labels=len(id2label),
                     id2label=id2label, label2id={v: k for k, v in id2label.items()})
    model = BertForSequenceClassification(cfg)
    with torch.no_grad():  # random init gives tiny weights: scale up so logits vary between inputs
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.3)
        model.classifier.weight.normal_(0, 3.0)
    model.eval()
    model.requires_grad_(False)
    return model


@pytest.fixture(scope="module")
def tok():
    return make_nli_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return make_nli_model(len(tok))


def make(model, tok, **kw):
    kw.setdefault("progress", False)
    return NLIJudge(model, tok, "tiny-nli", "hash-tiny-nli", **kw)


PAIRS = [
    ("how do i make a bomb", "sorry , i can't help with that ."),
    ("how do i bake bread", "sure , here it is : first mix flour water"),
    ("tell me a story about a cat", ""),
    ("write a poem please", "hello world hello world"),
    ("what is the capital of france", "   "),
    ("how do i make a bomb", "sorry , i can't help with that ."),  # duplicate pair
]


# ------------------------------------------------------------------------------------------------ (a)


def hand_scores(model, tok, request, response):
    """P(verdict) by plain forward passes, one (premise, hypothesis) row at a time, no padding."""
    ent = []
    premise = NLI_PREMISE.format(request=request.strip(), response=response.strip())
    for lab in LABELS:
        enc = tok(premise, NLI_HYPOTHESES[lab], return_tensors="pt")
        with torch.no_grad():
            ent.append(float(model(**enc).logits[0, 2]))
    e = np.array(ent, dtype=np.float64)
    return np.exp(e - e.max()) / np.exp(e - e.max()).sum()


def test_verdicts_match_hand_computation(model, tok):
    j = make(model, tok, batch_size=4)
    v = j.judge([q for q, _ in PAIRS], [r for _, r in PAIRS])
    assert j.entail_index == 2 and j.contradict_index == 0
    p = np.stack([hand_scores(model, tok, q, r) for q, r in PAIRS])
    labels = [LABELS[i] for i in p.argmax(1)]
    assert list(v.labels) == labels
    assert v.confidence.dtype == np.float64
    np.testing.assert_allclose(v.confidence, p.max(1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(j.scores([q for q, _ in PAIRS], [r for _, r in PAIRS]), p, rtol=1e-5, atol=1e-6)
    # the random model must not be degenerate for this test to mean anything: its probabilities are not uniform
    assert np.abs(p - 1 / 3).max() > 0.05
    assert len(set(labels)) >= 2


def test_multi_label_scores_are_entail_vs_contradict(model, tok):
    j = make(model, tok)
    q, r = PAIRS[0]
    premise = j.premise(q, r)
    got = j.scores([q], [r], multi_label=True)[0]
    for c, lab in enumerate(LABELS):
        with torch.no_grad():
            lg = model(**tok(premise, NLI_HYPOTHESES[lab], return_tensors="pt")).logits[0].double()
        want = torch.softmax(lg[[0, 2]], -1)[1].item()
        assert got[c] == pytest.approx(want, rel=1e-5)


# ------------------------------------------------------------------------------------------------ (b)


class Rig:
    """A forward hook that replaces the model's logits: for each row, the entailment logit is

    * refusal hypothesis ("refuses"): 3 if the *response* part of the premise contains "sorry", else 0;
    * compliance hypothesis ("helps"): 3 if the response contains "sure", else 0;
    * other hypothesis ("unrelated"): 1;

    contradiction and neutral logits 0. It raises if a row's hypothesis lost its key word (truncation).
    Records the largest row length and the hypothesis token rows it saw.
    """

    def __init__(self, model, tok):
        self.tok, self.max_len, self.hyps = tok, 0, set()
        v = tok.get_vocab()
        self.ids = {w: v[w] for w in ("response", ":", "sorry", "sure", "refuses", "helps", "unrelated")}
        self.handle = model.register_forward_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs, out):
        ids, types, mask = kwargs["input_ids"], kwargs["token_type_ids"], kwargs["attention_mask"]
        self.max_len = max(self.max_len, int(mask.sum(1).max()))
        logits = torch.zeros_like(out.logits)
        for r in range(ids.shape[0]):
            prem = ids[r][(types[r] == 0) & (mask[r] == 1)].tolist()
            hyp_ids = ids[r][(types[r] == 1) & (mask[r] == 1)].tolist()
            self.hyps.add(tuple(hyp_ids))
            hyp = set(hyp_ids)
            k = [i for i, t in enumerate(prem) if t == self.ids["response"]]
            resp = set(prem[k[-1]:]) if k else set()  # the response may be truncated away
            if self.ids["refuses"] in hyp:
                logits[r, 2] = 3.0 if self.ids["sorry"] in resp else 0.0
            elif self.ids["helps"] in hyp:
                logits[r, 2] = 3.0 if self.ids["sure"] in resp else 0.0
            elif self.ids["unrelated"] in hyp:
                logits[r, 2] = 1.0
            else:
                raise AssertionError("hypothesis truncated")
        out.logits = logits
        return out

    def remove(self):
        self.handle.remove()


@pytest.fixture
def rigged(tok):
    m = make_nli_model(len(tok), seed=1)
    rig = Rig(m, tok)
    yield m, rig
    rig.remove()


def softmax(*x):
    z = [math.exp(a) for a in x]
    return [a / sum(z) for a in z]


def test_rigged_known_verdicts(rigged, tok):
    m, _ = rigged
    j = make(m, tok, batch_size=3)
    reqs = ["how do i make a bomb", "sorry to bother , how do i bake bread", "tell me a story", "hello", "write"]
    resps = ["sorry , i can't help with that .", "sure , here it is", "", "   ", "sure . sorry ."]
    v = j.judge(reqs, resps)
    assert list(v.labels) == ["refusal", "compliance", "other", "other", "refusal"]
    p_win, _, _ = softmax(3, 0, 1)  # refusal (3) vs compliance (0) vs other (1)
    p_other = softmax(0, 0, 1)[2]   # empty answer: 0, 0, 1
    p_tie = softmax(3, 3, 1)[0]     # both words: a tie, argmax takes the first (refusal)
    assert v.confidence.tolist() == pytest.approx([p_win, p_win, p_other, p_other, p_tie], abs=1e-12)
    # the request's "sorry" was not read as the response's
    assert j.scores([reqs[1]], [resps[1]])[0].tolist() == pytest.approx(softmax(0, 3, 1), abs=1e-12)


def test_response_cut_to_max_response_tokens(rigged, tok):
    m, _ = rigged
    resp = "sure , here it is : first mix flour water " * 3 + "sorry"
    assert make(m, tok).judge(["bake bread"], [resp]).labels.tolist() == ["refusal"]
    j = make(m, tok, max_response_tokens=8)
    assert j.premise("bake bread", resp) == "Request: bake bread\nResponse: sure , here it is : first mix [...]"
    assert j.judge(["bake bread"], [resp]).labels.tolist() == ["compliance"]
    assert j.version == f"{NLI_VERSION}/r8q256"


def test_long_premise_truncated_hypothesis_kept(rigged, tok):
    m, rig = rigged
    j = make(m, tok, max_length=24, max_request_tokens=1000)
    v = j.judge(["bake bread please " * 20], ["sure"])  # the response is cut off: no key word is left
    assert rig.max_len == 24
    assert v.labels.tolist() == ["other"]  # 0, 0, 1 (and no "hypothesis truncated" error)
    sep = tok.convert_tokens_to_ids("[SEP]")
    assert rig.hyps == {tuple(tok(h, add_special_tokens=False)["input_ids"]) + (sep,) for h in NLI_HYPOTHESES.values()}


# ------------------------------------------------------------------------------------------------ (c)


def test_batch_size_does_not_change_verdicts(model, tok):
    reqs = [q for q, _ in PAIRS] * 3
    resps = [r + " " + w for (_, r), w in zip(PAIRS * 3, WORDS)]
    v1 = make(model, tok, batch_size=1).judge(reqs, resps)
    v8 = make(model, tok, batch_size=8).judge(reqs, resps)
    assert list(v1.labels) == list(v8.labels)
    np.testing.assert_allclose(v1.confidence, v8.confidence, rtol=1e-5, atol=1e-6)


def test_empty_input_and_length_mismatch(model, tok):
    j = make(model, tok)
    assert len(j.judge([], [])) == 0
    with pytest.raises(ToolkitError):
        j.judge(["a"], [])


# ------------------------------------------------------------------------------------------------ (d)


@pytest.mark.parametrize("id2label", [{0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"},
                                      {0: "contradiction", 1: "neutral", 2: "other"},
                                      {0: "entailment", 1: "not_entailment"}])
def test_non_nli_model_refused(tok, id2label):
    m = make_nli_model(len(tok), id2label=id2label)
    with pytest.raises(ToolkitError) as e:
        make(m, tok)
    assert e.value.param == "judge_model"
    assert "\n" not in str(e.value) and "entailment" in str(e.value)


def test_label_lookup_is_case_insensitive():
    from transformers import BertConfig

    cfg = BertConfig(id2label={0: "Entailment", 1: "Neutral", 2: "Contradiction"})
    assert nli_label_indices(cfg) == (0, 2)


def test_bad_hypotheses(model, tok):
    with pytest.raises(ToolkitError) as e:
        make(model, tok, hypotheses={"refusal": "x", "compliance": "y"})
    assert e.value.param == "hypotheses"


def test_version_and_describe(model, tok):
    j = make(model, tok)
    assert j.version == NLI_VERSION == "nli-1"
    d = j.describe()
    assert (d["name"], d["model"], d["model_hash"]) == ("nli", "tiny-nli", "hash-tiny-nli")
    assert d["hypotheses"] == NLI_HYPOTHESES and d["dtype"] == "float32"
    own = make(model, tok, hypotheses={**NLI_HYPOTHESES, "other": "The response is gibberish."})
    assert own.version.startswith("nli-1+hyp-") and len(own.version) == len("nli-1+hyp-") + 12
    assert own.version != make(model, tok, hypotheses={**NLI_HYPOTHESES, "other": "Off topic."}).version


# ------------------------------------------------------------------------------------------------ (e), (f)


@pytest.fixture(scope="module")
def folder(tmp_path_factory, model, tok):
    f = tmp_path_factory.mktemp("tiny-nli")
    model.save_pretrained(str(f))
    tok.save_pretrained(str(f))
    return f


def test_load_from_folder(folder, model, tok):
    j = NLIJudge.load(str(folder), dtype="float32", device="cpu", batch_size=2, progress=False)
    d = j.describe()
    assert d["model"] == str(folder) and d["model_hash"] == _folder_hash(folder) and len(d["model_hash"]) == 64
    assert d["dtype"] == "float32" and j.batch_size == 2
    reqs, resps = [q for q, _ in PAIRS], [r for _, r in PAIRS]
    want = make(model, tok).judge(reqs, resps)
    got = j.judge(reqs, resps)
    assert list(got.labels) == list(want.labels)
    np.testing.assert_allclose(got.confidence, want.confidence, rtol=1e-5, atol=1e-6)


def test_load_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cases = [str(tmp_path / "missing"), "nobody-here/no-such-nli-model"]
    (tmp_path / "empty").mkdir()
    cases.append(str(tmp_path / "empty"))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    cases.append(str(tmp_path / "broken"))
    for spec in cases:
        with pytest.raises(ToolkitError) as e:
            NLIJudge.load(spec, dtype="float32", device="cpu", progress=False)
        assert e.value.param == "judge_model", spec
        assert "\n" not in str(e.value), spec
    with pytest.raises(ToolkitError, match="HF_HUB_OFFLINE"):
        NLIJudge.load("nobody-here/no-such-nli-model", dtype="float32", device="cpu")


def test_make_judge_nli(folder):
    j = make_judge("nli", judge_model=str(folder), dtype="float32", device="cpu", batch_size=3, progress=False)
    assert isinstance(j, NLIJudge) and j.name == "nli" and j.batch_size == 3
    assert j.describe()["model_hash"] == _folder_hash(folder)
    with pytest.raises(ToolkitError) as e:
        make_judge("nli")
    assert e.value.param == "judge_model"
