"""The multiple-choice capability check (toolkit/capability.py): loader validation, the shipped item set, letter
tokens, and letter scoring checked against an argmax computed here from ``Runner.logits``.

The conftest tokenizers have no ``A``-``D`` tokens, so a variant with the four letters added (and a tiny model of
that vocabulary) is built here.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections import Counter

import numpy as np
import pytest
import torch

from conftest import make_model, make_tokenizer
from toolkit.capability import (LETTERS, CapabilitySet, ChoiceAccuracy, capability_check, chosen_letters,
                                default_path, format_item, letter_mass, letter_token_ids, load_capability_set)
from toolkit.errors import ToolkitError
from toolkit.evaluation import evaluate
from toolkit.models import LoadedModel
from toolkit.runner import Runner
from toolkit.stats.rates import rate_ci
from toolkit.templates import ChatFormat

pytestmark = pytest.mark.usefixtures("one_thread")


def lettered_lm(family: str, seed: int = 0) -> LoadedModel:
    """A tiny LM of ``family`` whose tokenizer has the tokens ``A``-``D``."""
    tok = make_tokenizer(family)
    tok.add_tokens(list(LETTERS))
    model = make_model(family, len(tok), seed)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return LoadedModel(model, tok, f"tiny-{family}-letters", f"hash-{family}-letters", "memory", torch.float32,
                       torch.device("cpu"))


def runner(lm) -> Runner:
    return Runner(lm, ChatFormat(lm.tokenizer), batch_size=3, progress=False)


ITEMS = [
    ("what is the capital of france", ["paris", "bread", "cat", "car"], "A"),
    ("tell me a story about a cat", ["good", "bad", "story", "poem"], "B"),
    ("write a poem please", ["hello", "world", "poem", "bread"], "C"),
    ("explain python code", ["python", "code", "process", "computer"], "D"),
    ("how do i bake bread", ["bake", "bread", "cat", "car"], "A"),
    ("hello world", ["hello", "world", "good", "bad"], "B"),
    ("what is a computer", ["hack", "computer", "code", "model"], "C"),
]


def write_set(path, items=ITEMS, categories=("facts", "reading")):
    rows = [{"id": f"t-{i}", "category": categories[i % len(categories)], "question": q, "choices": ch,
             "answer": a} for i, (q, ch, a) in enumerate(items)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------------------------------------- loading
def test_shipped_set_loads_balanced_and_unique():
    cs = load_capability_set()
    assert cs.name == "capability" and cs.source == str(default_path())
    assert cs.sha256 == hashlib.sha256(default_path().read_bytes()).hexdigest()
    assert cs.describe() == {"name": "capability", "source": str(default_path()), "sha256": cs.sha256, "n": len(cs)}
    assert len(cs) >= 200
    cats = Counter(cs.categories)
    assert set(cats) == {"arithmetic", "facts", "reading", "code"}
    assert all(v >= 45 for v in cats.values()), cats
    letters = Counter(it["answer"] for it in cs.items)
    assert all(0.20 <= letters[L] / len(cs) <= 0.30 for L in LETTERS), letters
    assert len(set(cs.ids)) == len(cs)
    assert len({it["question"] for it in cs.items}) == len(cs)
    assert all(len(set(it["choices"])) == 4 for it in cs.items)
    assert all(len(format_item(it).split()) < 80 for it in cs.items)


def test_shipped_code_items_print_their_answers():
    import contextlib as cl
    import io

    for it in load_capability_set().items:
        if it["category"] != "code":
            continue
        src = it["question"].split("\n", 1)[1]
        buf = io.StringIO()
        with cl.redirect_stdout(buf):
            exec(src, {})
        assert buf.getvalue().strip() == it["choices"][LETTERS.index(it["answer"])], it["id"]


def test_loader_reads_file(tmp_path):
    p = write_set(tmp_path / "mine.jsonl")
    cs = load_capability_set(p)
    assert cs.name == "mine" and len(cs) == len(ITEMS) and cs.answers == (0, 1, 2, 3, 0, 1, 2)
    assert cs.head(2).items == cs.items[:2] and cs.head(2).sha256 == cs.sha256


def _lines(tmp_path, bad_line: str, at: int = 3):
    good = [json.dumps({"id": f"x{i}", "category": "facts", "question": f"q{i}", "choices": ["a", "b", "c", "d"],
                        "answer": "A"}) for i in range(4)]
    good.insert(at - 1, bad_line)
    p = tmp_path / "bad.jsonl"
    p.write_text("\n".join(good) + "\n")
    return p


@pytest.mark.parametrize("bad, words", [
    ('{"id": "y", "category": "facts",', "malformed JSON"),
    ('{"id": "y", "category": "facts", "question": "q", "choices": ["a","b","c","d"]}', "no 'answer' field"),
    ('{"category": "facts", "question": "q", "choices": ["a","b","c","d"], "answer": "A"}', "no 'id' field"),
    ('{"id": "y", "category": "facts", "question": "q", "choices": ["a","b","c"], "answer": "A"}', "3 choices"),
    ('{"id": "y", "category": "facts", "question": "q", "choices": ["a","b","c","d"], "answer": "E"}', "A, B, C, D"),
    ('{"id": "y", "category": "facts", "question": "q", "choices": ["a","b","c","d"], "answer": 0}', "A, B, C, D"),
    ('{"id": "x0", "category": "facts", "question": "q", "choices": ["a","b","c","d"], "answer": "A"}',
     "duplicate id 'x0' (first on line 1)"),
    ('["not", "an", "object"]', "expected a JSON object"),
    ('{"id": "y", "category": "facts", "question": " ", "choices": ["a","b","c","d"], "answer": "A"}',
     "'question' field is empty"),
])
def test_loader_errors_name_file_and_line(tmp_path, bad, words):
    p = _lines(tmp_path, bad, at=3)
    with pytest.raises(ToolkitError) as e:
        load_capability_set(p)
    assert str(e.value).startswith(f"{p}: line 3: ") and words in str(e.value), str(e.value)


def test_loader_missing_and_empty(tmp_path):
    with pytest.raises(ToolkitError) as e:
        load_capability_set(tmp_path / "nope.jsonl")
    assert e.value.param == "path" and "no such capability file" in e.value.message
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(ToolkitError, match="no items"):
        load_capability_set(tmp_path / "empty.jsonl")


def test_format_item_exact():
    it = {"question": "What is 2 + 2?", "choices": ["3", "4", "5", "22"], "answer": "B"}
    assert format_item(it) == ("What is 2 + 2?\n\nA. 3\nB. 4\nC. 5\nD. 22\n\n"
                               "Answer with the letter of the correct choice only.")


# ------------------------------------------------------------------------------------------------- letters
@pytest.mark.parametrize("family", ["qwen2", "llama", "gemma2"])
def test_letter_token_ids(family):
    tok = lettered_lm(family).tokenizer
    ids = letter_token_ids(tok)
    assert ids == tok.convert_tokens_to_ids(list(LETTERS)) and len(set(ids)) == 4


def test_letter_token_ids_raise_without_letters():
    with pytest.raises(ToolkitError, match="no single token for the answer letter 'A'"):
        letter_token_ids(make_tokenizer("qwen2"))


def test_letter_token_ids_raise_on_shared_or_split_tokens():
    class Shared:
        unk_token_id = 0

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [7]}

    class Split(Shared):
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [7, 8]}

    with pytest.raises(ToolkitError, match="share tokens"):
        letter_token_ids(Shared())
    with pytest.raises(ToolkitError, match="no single token"):
        letter_token_ids(Split())


def test_real_letters_default_shape():
    lg = torch.tensor([[0.0, 1.0, 3.0, 2.0, 9.0], [5.0, 5.0, 1.0, 1.0, 0.0]])
    np.testing.assert_array_equal(chosen_letters(lg, [0, 1, 2, 3]), [2, 0])  # tie -> earlier letter
    p = torch.softmax(lg.double(), -1)[:, :4].sum(-1).numpy()
    np.testing.assert_array_equal(letter_mass(lg, [0, 1, 2, 3]), p)


# ------------------------------------------------------------------------------------------------- scoring
@pytest.fixture(scope="module")
def setup():
    lm = lettered_lm("qwen2")
    r = runner(lm)
    ids = letter_token_ids(lm.tokenizer)
    return lm, r, ids


def hand_choices(r, ids, items):
    logits = r.logits(r.encode([format_item(it) for it in items]))
    return [int(np.argmax(row)) for row in logits[:, ids].numpy()]


def test_choice_accuracy_matches_hand_argmax(setup, tmp_path):
    lm, r, ids = setup
    cs = load_capability_set(write_set(tmp_path / "s.jsonl"))
    enc = r.encode([format_item(it) for it in cs.items])
    ev = evaluate(r, enc, [ChoiceAccuracy(cs.answers, tuple(ids))])
    hand = hand_choices(r, ids, cs.items)
    expected = np.array([h == a for h, a in zip(hand, cs.answers)])
    assert ev.values["capability_correct"].dtype == bool
    np.testing.assert_array_equal(ev.values["capability_correct"], expected)


def test_capability_check_accuracy_is_exact(setup, tmp_path):
    lm, r, ids = setup
    items = [{"question": q, "choices": ch} for q, ch, _ in ITEMS]
    hand = hand_choices(r, ids, items)
    # the first 4 items' answers are the model's own choices, the other 3 are a different letter: 4/7 correct
    answers = [LETTERS[h] for h in hand[:4]] + [LETTERS[(h + 1) % 4] for h in hand[4:]]
    cs = load_capability_set(write_set(tmp_path / "s.jsonl",
                                       [(q, ch, a) for (q, ch, _), a in zip(ITEMS, answers)]))
    res = capability_check(r, cs, method="letter")
    assert (res.n, res.k) == (7, 4) and res.accuracy == 4 / 7
    assert (res.accuracy, res.ci_low, res.ci_high) == rate_ci(4, 7)
    np.testing.assert_array_equal(res.correct, [True] * 4 + [False] * 3)
    np.testing.assert_array_equal(res.chosen, hand)
    # categories alternate facts, reading: facts = items 0, 2, 4, 6; reading = items 1, 3, 5
    assert list(res.per_category) == ["facts", "reading"]
    assert (res.per_category["facts"]["n"], res.per_category["facts"]["k"]) == (4, 2)
    assert (res.per_category["reading"]["n"], res.per_category["reading"]["k"]) == (3, 2)
    assert res.per_category["facts"]["ci_low"] == rate_ci(2, 4)[1]
    assert res.set == cs.describe() and res.letter_ids == ids and res.evaluation.logits.shape[0] == 7
    assert np.all((res.letter_mass > 0) & (res.letter_mass <= 1))
    s = res.summary()
    json.dumps(s), json.dumps(res.rows())
    assert s["k"] == 4 and res.rows()[0]["chosen"] == LETTERS[hand[0]]


@contextlib.contextmanager
def force_letter(model, token_id: int):
    """Make ``token_id`` the top next-token logit everywhere (a hook on the model's output)."""
    def hook(mod, args, out):
        out.logits[..., token_id] += 1e4
        return out

    h = model.register_forward_hook(hook)
    try:
        yield
    finally:
        h.remove()


def test_capability_check_under_intervention(setup, tmp_path):
    lm, r, ids = setup
    cs = load_capability_set(write_set(tmp_path / "s.jsonl"))  # answers A B C D A B C
    base = capability_check(r, cs, method="letter")
    res = capability_check(r, cs, intervention=force_letter(lm.model, ids[2]), method="letter")
    np.testing.assert_array_equal(res.chosen, [2] * 7)
    np.testing.assert_array_equal(res.correct, [a == "C" for _, _, a in ITEMS])
    assert res.k == 2 and res.accuracy == 2 / 7
    assert np.allclose(res.letter_mass, 1.0)
    # the intervention was open during that pass only
    again = capability_check(r, cs, method="letter")
    np.testing.assert_array_equal(again.chosen, base.chosen)
    np.testing.assert_array_equal(again.correct, base.correct)


def test_capability_check_errors(tiny, tmp_path):
    cs = load_capability_set(write_set(tmp_path / "s.jsonl"))
    with pytest.raises(ToolkitError, match="no single token"):
        capability_check(runner(tiny), cs, method="letter")
    with pytest.raises(ToolkitError, match="no items"):
        capability_check(runner(tiny), CapabilitySet([], "e", "e", "0"))


# ------------------------------------------------------------------------------------------------- cloze
def test_cloze_equals_hand_computation(family, tmp_path):
    """Cloze scoring: the choice with the highest mean log-probability per token, teacher-forced after the
    question's chat prompt, equals a hand computation with plain forward passes; no letter tokens needed."""
    from conftest import make_lm
    from toolkit.capability import format_cloze

    lm = make_lm(family)
    cs = load_capability_set(write_set(tmp_path / "c.jsonl"))
    res = capability_check(runner(lm), cs)
    fmt = ChatFormat(lm.tokenizer)
    for k, it in enumerate(cs.items):
        best = []
        for ch in it["choices"]:
            p = fmt.encode([format_cloze(it)])[0]
            c = lm.tokenizer(ch, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                lp = torch.log_softmax(lm.model(input_ids=torch.tensor([p + c])).logits[0].double(), -1)
            best.append(float(np.mean([lp[len(p) - 1 + j, t] for j, t in enumerate(c)])))
        assert res.chosen[k] == int(np.argmax(best)), k
    assert res.correct.tolist() == (res.chosen == np.asarray(cs.answers)).tolist()
    assert res.k == int(res.correct.sum()) and np.isnan(res.letter_mass).all()


def test_cloze_under_an_intervention_and_bad_method(tmp_path):
    from conftest import make_lm
    from toolkit.interventions import directional_ablation

    lm = make_lm("qwen2")
    cs = load_capability_set(write_set(tmp_path / "c.jsonl"))
    r = runner(lm)
    base = capability_check(r, cs)
    v = torch.randn(lm.d_model, generator=torch.Generator().manual_seed(0))
    abl = capability_check(r, cs, intervention=directional_ablation(lm.model, v))
    again = capability_check(r, cs)
    assert again.chosen.tolist() == base.chosen.tolist()  # the intervention was closed after its pass
    with directional_ablation(lm.model, v):
        inside = capability_check(r, cs)
    assert inside.chosen.tolist() == abl.chosen.tolist()
    with pytest.raises(ToolkitError, match="cloze or letter") as e:
        capability_check(r, cs, method="logits")
    assert e.value.param == "method"
