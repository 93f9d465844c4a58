"""Head-level directional ablation (:mod:`toolkit.heads`) and ``refusal ablate --heads/--heads-from``.

Identities on tiny models of every family in conftest (Qwen2, Llama, Gemma 2; all with grouped-query attention:
4 query heads, 2 key/value heads), float32:

(a) ablating every head of some layers equals projecting ``r`` out of ``o_proj``'s output there; on Qwen2/Llama that
    is ``attn_out`` itself, on Gemma 2 a norm follows ``o_proj`` so ``attn_out`` differs (checked);
(b) hook form == weight-edit form (also on a Llama with ``head_dim != d_model / n_heads`` and an ``o_proj`` bias);
(c) no heads, or heads whose ``W_O^h`` is already orthogonal to ``r``, change nothing;
(d) after ablation each chosen head's contribution has no component along ``r``;
(e) parse errors; (f) the CLI with ``--heads`` and ``--heads-from`` (a real tiny patch run and hand-written ones).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from test_cli import FAST, assert_ok, assert_usage_error, entries, invoke, tiny_files
from toolkit.directions import save_direction
from toolkit.errors import ToolkitError
from toolkit.heads import (HeadSelection, head_ablation, head_projection, heads_from_patch, orthogonalize_heads,
                           parse_heads)
from toolkit.hooks import decoder_layers, has_post_norms, hooked
from toolkit.interventions import project_out
from toolkit.patching import HeadLayout, head_layout, head_outputs

IDS = torch.tensor([[1, 5, 7, 9, 11, 3, 20, 4], [2, 6, 8, 10, 12, 14, 16, 18]])
LAYOUT = HeadLayout(4, 2, 8)


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def unit(seed: int, d: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(d, generator=g)
    return r / r.norm()


def o_proj_ablation(model, r, layers):
    """Directional ablation applied only at the output of ``o_proj`` of ``layers`` (the reference of (a))."""
    return hooked(model, [("o_proj", l, lambda x, ctx: project_out(x, r)) for l in layers])


def attn_out_ablation(model, r, layers):
    """Directional ablation applied only at ``attn_out`` of ``layers``."""
    return hooked(model, [("attn_out", l, lambda x, ctx: project_out(x, r)) for l in layers])


def llama_wide_heads():
    """A Llama with head_dim 16 (o_proj takes 4 * 16 = 64 > d_model 32 inputs), GQA and biased projections."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, attention_bias=True,
                                     max_position_embeddings=64))
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m.eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------- (a) all heads
def test_all_heads_of_layers_equal_ablation_at_o_proj_output(tiny):
    m, r = tiny.model, unit(0)
    sel = parse_heads("1.*,3.*", tiny.n_layers, head_layout(m))
    assert len(sel.heads) == 8
    base = logits(m)
    with head_ablation(m, r, sel):
        got = logits(m)
    with o_proj_ablation(m, r, [1, 3]):
        ref = logits(m)
    with attn_out_ablation(m, r, [1, 3]):
        at_attn_out = logits(m)
    assert (got - base).abs().max() > 1e-2  # it does something
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    if has_post_norms(m):  # Gemma 2: a norm follows o_proj, so attn_out is another site
        assert (got - at_attn_out).abs().max() > 1e-3
    else:  # Qwen2/Llama: attn_out is o_proj's output (no bias in these o_proj)
        assert decoder_layers(m)[1].self_attn.o_proj.bias is None
        torch.testing.assert_close(got, at_attn_out, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------- (b) hook == weights
def _hook_vs_weights(m, sel, r):
    edited = copy.deepcopy(m)
    info = orthogonalize_heads(edited, r * 3.0, sel)  # any norm
    with head_ablation(m, r, sel):
        hooked_logits = logits(m)
    got = logits(edited)
    assert (hooked_logits - logits(m)).abs().max() > 1e-2
    torch.testing.assert_close(got, hooked_logits, atol=1e-5, rtol=1e-5)
    return edited, info


def test_hook_form_equals_weight_edit(tiny):
    m, r = tiny.model, unit(1)
    sel = parse_heads("0.1,2.0:3,3.3", tiny.n_layers, head_layout(m))
    edited, info = _hook_vs_weights(m, sel, r)
    assert info == {"edited": [f"layers.{l}.self_attn.o_proj.weight" for l in (0, 2, 3)],
                    "heads": ["0.1", "2.0", "2.1", "2.2", "3.3"], "untied_lm_head": False, "exact_equivalent": True}
    # only the chosen heads' columns of o_proj changed
    chosen = {(0, 1), (2, 0), (2, 1), (2, 2), (3, 3)}
    before, after = dict(m.named_parameters()), dict(edited.named_parameters())
    for name, p in before.items():
        if "o_proj" not in name:
            assert torch.equal(p, after[name]), name
    for l, block in enumerate(decoder_layers(m)):
        w0, w1 = block.self_attn.o_proj.weight, decoder_layers(edited)[l].self_attn.o_proj.weight
        for h in range(4):
            s = LAYOUT.head_slice(h)
            assert torch.equal(w0[:, s], w1[:, s]) == ((l, h) not in chosen), (l, h)
            if (l, h) in chosen:  # (I - r r^T) W_O^h: no column left along r
                assert (r @ w1[:, s]).abs().max() < 1e-6


def test_hook_form_equals_weight_edit_with_wide_heads_and_bias():
    m = llama_wide_heads()
    lay = head_layout(m)
    assert (lay.n_heads, lay.n_kv_heads, lay.head_dim) == (4, 2, 16)
    sel = parse_heads("1.0,1.3,2.*", 3, lay)
    bias = decoder_layers(m)[1].self_attn.o_proj.bias.clone()
    edited, _ = _hook_vs_weights(m, sel, unit(2))
    assert torch.equal(decoder_layers(edited)[1].self_attn.o_proj.bias, bias)  # bias untouched


# --------------------------------------------------------------------------------------------- (c) no change
def test_no_heads_change_nothing(tiny):
    m = tiny.model
    base = logits(m)
    with head_ablation(m, unit(3), HeadSelection(())):
        assert torch.equal(logits(m), base)
    edited = copy.deepcopy(m)
    assert orthogonalize_heads(edited, unit(3), HeadSelection(()))["edited"] == []
    assert torch.equal(logits(edited), base)


def test_heads_already_orthogonal_to_r_change_nothing(tiny):
    m = tiny.model
    w = decoder_layers(m)[2].self_attn.o_proj.weight.double()  # [32, 32]
    cols = torch.cat([w[:, LAYOUT.head_slice(h)] for h in (0, 3)], dim=1)  # W_O^0, W_O^3: [32, 16]
    q, _ = torch.linalg.qr(cols)
    v = unit(4).double()
    r = v - q @ (q.T @ v)  # orthogonal to every column of W_O^0 and W_O^3
    assert (r @ cols).abs().max() < 1e-12 and r.norm() > 0.1
    sel = parse_heads("2.0,2.3", tiny.n_layers, head_layout(m))
    base = logits(m)
    with head_ablation(m, r.float(), sel):
        torch.testing.assert_close(logits(m), base, atol=1e-5, rtol=0)
    with head_ablation(m, unit(4), sel):  # a generic direction does change them
        assert (logits(m) - base).abs().max() > 1e-2
    edited = copy.deepcopy(m)
    orthogonalize_heads(edited, r.float(), sel)
    torch.testing.assert_close(decoder_layers(edited)[2].self_attn.o_proj.weight,
                               decoder_layers(m)[2].self_attn.o_proj.weight, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------------- (d) zero projection
def test_chosen_heads_write_nothing_along_r(tiny):
    m, r = tiny.model, unit(5)
    layer, chosen = 2, [1, 2]
    sel = parse_heads("2.1,2.2,0.0", tiny.n_layers, head_layout(m))
    got = {}

    def keep(name):
        def fn(x, ctx):
            got[name] = x.detach().clone()
        return fn

    reads = [("z", layer, keep("z")), ("o_proj", layer, keep("out"))]
    with hooked(m, reads, write=False):
        logits(m)
    before = head_projection(m, layer, got["z"], r)  # [batch, pos, n_heads]
    assert before[..., chosen].abs().min() > 1e-4  # the chosen heads do write along r
    with head_ablation(m, r, sel), hooked(m, reads, write=False):  # reads registered after: they see the result
        logits(m)
    z, out = got["z"], got["out"]
    contrib = head_outputs(m, layer, z)  # [batch, pos, n_heads, d_model], unedited weights
    others = [h for h in range(4) if h not in chosen]
    chosen_part = out - contrib[..., others, :].sum(-2)  # what the chosen heads now write (no bias here)
    assert (chosen_part @ r).abs().max() < 1e-5
    torch.testing.assert_close(chosen_part - (chosen_part @ r).unsqueeze(-1) * r,
                               project_out(contrib[..., chosen, :].sum(-2), r), atol=1e-5, rtol=1e-5)
    # the weight form: each chosen head's own contribution is orthogonal to r, the others are as before
    edited = copy.deepcopy(m)
    orthogonalize_heads(edited, r, sel)
    after = head_projection(edited, layer, z, r)
    assert after[..., chosen].abs().max() < 1e-5
    torch.testing.assert_close(after[..., others], head_projection(m, layer, z, r)[..., others])


# --------------------------------------------------------------------------------------------- (e) parsing
def test_parse_heads_normalises():
    sel = parse_heads("3.*, 1.3,1.0,1.3,-1.-1", 4, LAYOUT)
    assert sel.heads == ((1, 0), (1, 3), (3, 0), (3, 1), (3, 2), (3, 3))
    assert sel.labels == ["1.0", "1.3", "3.0", "3.1", "3.2", "3.3"]
    assert sel.by_layer() == {1: (0, 3), 3: (0, 1, 2, 3)} and sel.layers == (1, 3)
    assert parse_heads("0:2.1:3", 4, LAYOUT).heads == ((0, 1), (0, 2), (1, 1), (1, 2))
    assert parse_heads("*.0", 2, LAYOUT).heads == ((0, 0), (1, 0))
    assert sel.describe() == {"source": "list", "heads": sel.labels, "n_heads": 6, "layers": [1, 3],
                              "spec": "3.*, 1.3,1.0,1.3,-1.-1"}


@pytest.mark.parametrize("spec, needle", [
    ("", "names no head"), (" , ", "names no head"), ("12", "not LAYER.HEAD"), ("1.2.3", "not LAYER.HEAD"),
    ("x.1", "layer 'x'"), ("1.a", "head 'a'"), ("4.0", "layer 4 in '4.0' is out of range: this model has 4 layers"),
    ("-5.0", "layer -5"), ("0.4", "head 4 in '0.4' is out of range: this model has 4 query heads"),
    ("2:2.0", "layer range '2:2'"), ("1.3:1", "head range '3:1'"), ("1.0:9", "head 4"),
])
def test_parse_heads_errors(spec, needle):
    with pytest.raises(ToolkitError) as e:
        parse_heads(spec, 4, LAYOUT)
    assert e.value.param == "heads"
    assert needle in e.value.message and "\n" not in str(e.value)


def test_selection_check_names_its_source():
    with pytest.raises(ToolkitError, match="head 5") as e:
        HeadSelection(((0, 5),), "patch").check(4, LAYOUT)
    assert e.value.param == "heads_from"
    with pytest.raises(ToolkitError, match="layer 7") as e:
        HeadSelection(((7, 0),)).check(4, LAYOUT)
    assert e.value.param == "heads"


def test_head_ablation_refuses_bad_heads_and_directions(tiny):
    m = tiny.model
    with pytest.raises(ToolkitError, match="head 9"):
        with head_ablation(m, unit(0), HeadSelection(((0, 9),))):
            pass
    with pytest.raises(ToolkitError, match="d_model"):
        with head_ablation(m, torch.ones(7), HeadSelection(((0, 1),))):
            pass
    with pytest.raises(ToolkitError, match="zero"):
        orthogonalize_heads(m, torch.zeros(32), HeadSelection(((0, 1),)))
    assert not any(mod._forward_hooks or mod._forward_pre_hooks for mod in m.modules())  # nothing left behind


# --------------------------------------------------------------------------------------------- patch runs
def write_patch_run(folder: Path, rows: list[tuple], *, command: str = "patch", model_hash: str | None = None) -> Path:
    """A finished patch run by hand: run.json and a summary.csv in the format experiments/patch.py writes
    (rows: (direction, site, layer, head or None, effect))."""
    folder.mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({
        "schema_version": 1, "command": command, "name": folder.name, "model": {"hash": model_hash},
        "prompt_sets": [], "params": {}, "results": {}}))
    df = pd.DataFrame([{"direction": d, "site": s, "layer": l, "position": -1 if h is None else None,
                        "positions": "-1", "head": h, "kv_group": None if h is None else h // 2,
                        "component": f"L{l} {s}" + ("" if h is None else f" head {h}") + " p-1", "n_pairs": 3,
                        "mean_score": 0.0, "normalised": 0.0, "ci_low": None, "ci_high": None, "effect": e,
                        "rank": 0} for d, s, l, h, e in rows]).astype({"head": "Int64", "kv_group": "Int64",
                                                                       "position": "Int64"})
    df.to_csv(folder / "summary.csv", index=False)
    return folder


ROWS = [("denoise", "attn_out", 1, None, 9.0), ("denoise", "z", 1, 0, 0.9), ("denoise", "z", 1, 1, 0.1),
        ("denoise", "z", 2, 3, 0.5),
        ("noise", "attn_out", 1, None, 9.0), ("noise", "z", 1, 0, 0.2), ("noise", "z", 1, 1, 0.7),
        ("noise", "z", 2, 3, 0.7), ("noise", "z", 0, 2, float("nan")), ("noise", "z", 2, 0, -0.3)]


def test_heads_from_patch_ranks_by_effect(tmp_path):
    run = write_patch_run(tmp_path / "p", ROWS, model_hash="abc")
    sel = heads_from_patch(run, 2)  # noise by default; tie at 0.7 -> lower layer first; NaN skipped
    assert (sel.heads, sel.ranked, sel.effects) == (((1, 1), (2, 3)), ((1, 1), (2, 3)), (0.7, 0.7))
    assert (sel.source, sel.top_k, sel.patch_direction, sel.model_hash) == ("patch", 2, "noise", "abc")
    sel = heads_from_patch(run / "run.json", 3)
    assert sel.ranked == ((1, 1), (2, 3), (1, 0)) and sel.heads == ((1, 0), (1, 1), (2, 3))
    assert sel.describe()["ranked"] == [{"head": "1.1", "effect": 0.7}, {"head": "2.3", "effect": 0.7},
                                        {"head": "1.0", "effect": 0.2}]
    assert heads_from_patch(run, 1, "denoise").heads == ((1, 0),)
    only_denoise = write_patch_run(tmp_path / "d", ROWS[:4])
    assert heads_from_patch(only_denoise, 1).patch_direction == "denoise"


@pytest.mark.parametrize("rows, command, k, needle", [
    (ROWS, "patch", 5, "ranks only 4 head(s), fewer than the 5"),
    ([r for r in ROWS if r[1] != "z"], "patch", 1, "no per-head results"),
    (ROWS, "extract", 1, "is a 'extract' run, expected a 'patch' run"),
])
def test_heads_from_patch_errors(tmp_path, rows, command, k, needle):
    run = write_patch_run(tmp_path / "p", rows, command=command)
    with pytest.raises(ToolkitError) as e:
        heads_from_patch(run, k)
    assert needle in str(e.value) and e.value.param is None


def test_heads_from_patch_bad_k_and_direction(tmp_path):
    run = write_patch_run(tmp_path / "p", ROWS[:4])
    with pytest.raises(ToolkitError) as e:
        heads_from_patch(run, 0)
    assert e.value.param == "top_k"
    with pytest.raises(ToolkitError, match="no 'noise' head results"):
        heads_from_patch(run, 1, "noise")
    with pytest.raises(ToolkitError, match="no run at"):
        heads_from_patch(tmp_path / "missing", 1)


# --------------------------------------------------------------------------------------------- (f) CLI
@pytest.fixture(scope="module")
def cli_env(tmp_path_factory):
    """A tiny Qwen2 folder, prompt files, a direction file and a real tiny ``refusal patch`` run."""
    base = tmp_path_factory.mktemp("heads")
    model, h, b = tiny_files(base)
    direction = base / "r.safetensors"
    save_direction(direction, unit(7) * 4.0, {"d_model": 32})
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("REFUSAL_RUNS", str(base / "runs"))
        mp.setenv("TQDM_DISABLE", "1")
        assert_ok(invoke(["patch", "--harmful", h, "--harmless", b, "--model", model, "--dtype", "float32",
                          "--layers", "1:3", "--sites", "attn_out", "--positions", "-1", "--head-positions", "-1",
                          "--pairs", "3", "--max-len-diff", "10", "--bootstrap", "0", "--quiet", "--name", "p"]))
    return {"base": base, "model": model, "h": h, "b": b, "direction": direction,
            "patch": base / "runs" / "patch" / "p"}


def ablate_args(env, *extra):
    return ["ablate", "--direction", env["direction"], "--harmful", env["h"], "--harmless", env["b"], "--model",
            env["model"], "--dtype", "float32", "--over-refusal", "none", *FAST, *extra]


def test_ablate_heads_runs_records_and_saves(cli_env, runs):
    from transformers import AutoModelForCausalLM

    saved = cli_env["base"] / "heads-ortho"
    out = assert_ok(invoke(ablate_args(cli_env, "--heads", "1.*,2.0", "--name", "hd", "--save", saved)))
    assert "from 5 head(s) 1.0,1.1,1.2,1.3,2.0" in " ".join(out.split())
    assert_ok(invoke(ablate_args(cli_env, "--name", "full")))
    hd, full = runs / "ablate" / "hd", runs / "ablate" / "full"
    for f in ("results.csv", "summary.csv", "damage.csv"):  # same tables as a full ablation run
        a, b = pd.read_csv(hd / f), pd.read_csv(full / f)
        assert list(a.columns) == list(b.columns), f
    sm = pd.read_csv(hd / "summary.csv")
    assert set(sm.condition) == {"baseline", "ablated", "orthogonalized"}
    meta = json.loads((hd / "run.json").read_text())
    assert meta["params"]["heads"] == "1.*,2.0" and meta["params"]["heads_from"] is None
    assert meta["results"]["heads"] == {"source": "list", "heads": ["1.0", "1.1", "1.2", "1.3", "2.0"],
                                        "n_heads": 5, "layers": [1, 2], "spec": "1.*,2.0"}
    orth = meta["results"]["orthogonalized"]
    assert orth["scope"] == "heads" and orth["n_edited"] == 2 and orth["exact_equivalent"] is True
    assert orth["max_abs_logit_diff_vs_hooks"] < 1e-4
    assert "heads" not in json.loads((full / "run.json").read_text())["results"]

    # the saved checkpoint equals the hook form on the source model; only layers 1 and 2's o_proj changed
    orig = AutoModelForCausalLM.from_pretrained(str(cli_env["model"]), dtype=torch.float32).eval()
    ortho = AutoModelForCausalLM.from_pretrained(str(saved), dtype=torch.float32).eval()
    from toolkit.directions import load_direction

    r, _ = load_direction(cli_env["direction"])
    sel = parse_heads("1.*,2.0", 4, head_layout(orig))
    with head_ablation(orig, r, sel):
        want = logits(orig)
    torch.testing.assert_close(logits(ortho), want, atol=1e-5, rtol=1e-5)
    po, pn = orig.state_dict(), ortho.state_dict()
    changed = {k for k in po if not torch.equal(po[k], pn[k])}
    assert changed == {"model.layers.1.self_attn.o_proj.weight", "model.layers.2.self_attn.o_proj.weight"}

    assert_ok(invoke(["compare", hd, full, "--name", "cmp"]))  # side by side
    table = pd.read_csv(runs / "compare" / "cmp" / "comparison.csv")
    assert set(table.run) == {"ablate/hd", "ablate/full"}


def test_ablate_heads_from_a_patch_run(cli_env, runs):
    assert_ok(invoke(ablate_args(cli_env, "--heads-from", cli_env["patch"], "--top-heads", "3", "--name", "pf")))
    summary = pd.read_csv(cli_env["patch"] / "summary.csv")
    z = summary[(summary.direction == "noise") & (summary.site == "z")].sort_values("rank").head(3)
    want = [f"{l}.{h}" for l, h in zip(z.layer, z["head"].astype(int))]  # the patch run's own ranking
    meta = json.loads((runs / "ablate" / "pf" / "run.json").read_text())
    rec = meta["results"]["heads"]
    assert [x["head"] for x in rec["ranked"]] == want
    assert rec["heads"] == sorted(want, key=lambda s: tuple(map(int, s.split("."))))
    assert (rec["source"], rec["top_k"], rec["patch_direction"]) == ("patch", 3, "noise")
    assert rec["run"] == str(cli_env["patch"]) and meta["params"]["top_heads"] == 3


def test_ablate_heads_from_default_k_is_ten(cli_env, runs):
    r = invoke(ablate_args(cli_env, "--heads-from", cli_env["patch"]))
    assert_usage_error(r, "--heads-from", "ranks only 8 head(s), fewer than the 10")
    assert entries(runs / "ablate") == set()


@pytest.mark.parametrize("extra, needles", [
    (["--heads", "9.0"], ["--heads:", "layer 9"]),
    (["--heads", "1.x"], ["--heads:", "head 'x'"]),
    (["--heads", "1.0", "--heads-from", "p"], ["--heads:", "--heads-from", "not both"]),
    (["--top-heads", "2"], ["--top-heads:", "--heads-from"]),
    (["--heads-from", "missing-run", "--top-heads", "2"], ["--heads-from:", "no run at missing-run"]),
    (["--heads-from", "p", "--top-heads", "0"], ["--top-heads"]),
])
def test_ablate_heads_bad_input(cli_env, runs, extra, needles):
    assert_usage_error(invoke(ablate_args(cli_env, *extra)), *needles)
    assert entries(runs / "ablate") == set()


def test_ablate_heads_from_another_model_or_out_of_range(cli_env, runs, tmp_path):
    other = write_patch_run(tmp_path / "other", ROWS, model_hash="f" * 64)
    assert_usage_error(invoke(ablate_args(cli_env, "--heads-from", other, "--top-heads", "1")),
                       "--heads-from:", "another model", "ffffffffffff")
    wide = write_patch_run(tmp_path / "wide", [("noise", "z", 1, 6, 1.0)])
    assert_usage_error(invoke(ablate_args(cli_env, "--heads-from", wide, "--top-heads", "1")),
                       "--heads-from:", "head 6")
    assert entries(runs / "ablate") == set()
