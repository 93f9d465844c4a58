"""`refusal extract --method`: every estimator through the CLI on a tiny model, against a direct computation from
the activations the command read."""

import json

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from tests.test_cli import D_MODEL, EXTRACT_FAST, N_LAYERS, N_POST, PERMISSIVE, assert_ok, invoke, sets  # noqa: F401 (fixture)
from toolkit.directions import Direction
from toolkit.estimators import METHOD_LABELS, cosine


@pytest.mark.parametrize("method", ["diff-means", "geometric-median", "pca", "probe", "caa"])
def test_extract_method_writes_its_directions(env, sets, tiny_folder, method):
    h, b = sets
    r = invoke(["extract", "--harmful", h, "--harmless", b, "--model", tiny_folder, *EXTRACT_FAST, *PERMISSIVE,
                "--method", method, "--name", method])
    assert_ok(r)
    folder = env / "extract" / method
    cands = load_file(str(folder / "candidates.safetensors"))
    n_pos = 1 if method == "caa" else N_POST
    assert tuple(cands["directions"].shape) == (N_LAYERS, n_pos, D_MODEL)
    assert tuple(cands["diff_means"].shape) == (N_LAYERS, n_pos, D_MODEL)
    if method == "diff-means":
        torch.testing.assert_close(cands["directions"], cands["diff_means"])
        torch.testing.assert_close(cands["diff_means"], cands["mean_harmful"] - cands["mean_harmless"])
    d = Direction.resolve(str(folder))
    assert d.method == METHOD_LABELS[method] and d.extra["estimator"] == method
    run = json.loads((folder / "run.json").read_text())
    ch = run["results"]["chosen"]
    assert run["results"]["estimator"]["method"] == method
    assert 0.0 <= ch["probe_accuracy"] <= 1.0
    li = list(range(N_LAYERS)).index(ch["layer"])
    pi = (cands["positions"].tolist()).index(ch["pos"])
    want = float(cosine(cands["directions"][li, pi], cands["diff_means"][li, pi]))
    assert ch["cos_diff_means"] == pytest.approx(want, abs=1e-6)
    est = pd.read_csv(folder / "estimator.csv")
    assert len(est) == N_LAYERS * n_pos
    assert (est.probe_accuracy.notna().all()) == (method == "probe")
    if method == "caa":
        assert cands["positions"].tolist() == [-1] and d.extra["read_at"]


def test_extract_sample_draws_by_seed(env, sets, tiny_folder):
    h, b = sets
    base = ["extract", "--harmful", h, "--harmless", b, "--model", tiny_folder, *EXTRACT_FAST, *PERMISSIVE,
            "--n-train", "2", "--sample"]
    for seed in (0, 1):
        assert_ok(invoke(base + ["--seed", str(seed), "--name", f"s{seed}"]))
    ids = [{p["name"]: p["n"] for p in json.loads((env / "extract" / f"s{s}" / "run.json").read_text())["prompt_sets"]}
           for s in (0, 1)]
    assert ids[0] == ids[1]  # 2 of each training set, whole validation sets
    r = invoke(["extract", "--harmful", h, "--harmless", b, "--model", tiny_folder, *EXTRACT_FAST, "--sample",
                "--name", "x"])
    assert r.exit_code == 2 and "n_train" in r.output.replace("-", "_")


def test_extract_unknown_method(env, sets, tiny_folder):
    h, b = sets
    r = invoke(["extract", "--harmful", h, "--harmless", b, "--model", tiny_folder, "--method", "lda", "--name", "x"])
    assert r.exit_code == 2 and "lda" in r.output
    assert not (env / "extract" / "x").exists()


def test_refused_minus_complied_splits_harmful_prompts_by_verdict(tiny, monkeypatch):
    """The groups are the harmful training prompts by the judge's verdict, whatever the filter; both must exist."""
    import numpy as np

    from toolkit import selection
    from toolkit.runner import Runner
    from toolkit.templates import ChatFormat

    lm = tiny
    r = Runner(lm, ChatFormat(lm.tokenizer), batch_size=4, progress=False)
    harmful = ["how do i make a bomb", "how do i kill a process", "steal car", "hack computer"]
    harmless = ["bake bread", "plant a tree", "sing a song"]
    real = selection.evaluate
    verdict = np.array([True, False, True, False])

    def fake(runner, enc, fn, gen_tokens=0, desc="", **kw):
        ev = real(runner, enc, fn, gen_tokens=gen_tokens, desc=desc, **kw)
        if desc == "harmful train":
            assert gen_tokens > 0  # the verdict is judged even with filter_by="none"
            ev.values["verdict"] = np.where(verdict, "refusal", "compliance")
        return ev

    monkeypatch.setattr(selection, "evaluate", fake)
    c = selection.build_candidates(r, r.encode(harmful), r.encode(harmless), [1], filter_by="none",
                                   method="refused-minus-complied", layers=[1, 2])
    with r.capture(4, [1, 2], ["resid_pre"], r.fmt.post_positions()) as acts:
        r.logits(r.encode(harmful))
    a = acts["resid_pre"].double()
    want = a[[0, 2]].mean(0) - a[[1, 3]].mean(0)
    torch.testing.assert_close(c.dirs, want, rtol=1e-5, atol=1e-5)
    verdict[:] = True
    from toolkit.errors import ToolkitError

    with pytest.raises(ToolkitError, match="refused 4 of 4"):
        selection.build_candidates(r, r.encode(harmful), r.encode(harmless), [1], filter_by="none",
                                   method="refused-minus-complied", layers=[1])
