"""Steering and dose-response on the default model (slow: about 4 minutes on two CPU cores, warm cache).

A smaller version of ``just steer-demo`` and ``just dose-response-demo`` through the CLI, checking the issue's
acceptance behaviour: the Refusal Dial direction learned at layer 12 on one half of ``borderline`` raises the
mean refusal score monotonically over a moderate alpha range on both halves and on harmful prompts, lies
outside the random band there, and moves the held-out half about as much as the training half; the
dose-response command writes its ED50/TI-S summary and plot. Run with ``pytest -m slow``.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

pytestmark = pytest.mark.slow


def _ok(result):
    assert result.exit_code == 0, result.output[-3000:]


def test_steer_and_dose_response_on_default_model(runs):
    from experiments.cli import app

    cli = CliRunner()
    _ok(cli.invoke(app, ["steer", "--learn", "borderline", "--layers", "12", "--alpha=-0.3:0.3:0.15",
                         "--random", "4", "--orthogonal", "2", "--sets", "harmful", "--limit", "20", "--name", "s",
                         "-q"]))
    run = runs / "steer" / "s"
    meta = json.loads((run / "run.json").read_text())
    for m in meta["results"]["monotonic"]:
        assert (m["monotone_from"], m["monotone_to"]) == (-0.3, 0.3), m
    band = pd.read_csv(run / "band.csv")
    nonzero = band[band.alpha != 0]
    assert nonzero.mean_score_random_outside.astype(bool).all(), nonzero.to_string()
    eff = {}
    for part in ("train", "holdout"):
        g = band[(band.set == "borderline") & (band.part == part)].set_index("alpha").mean_score
        eff[part] = g[0.3] - g[0.0]
    assert eff["train"] > 0.5 and eff["holdout"] > 0.5 and 0.5 < eff["holdout"] / eff["train"] < 2, eff

    _ok(cli.invoke(app, ["dose-response", "--direction", str(run / "direction_L12.safetensors"),
                         "--alpha=-0.3:0.6:0.3", "--limit", "16", "--gen-tokens", "8", "--bootstrap", "200",
                         "--name", "d", "-q"]))
    d = runs / "dose-response" / "d"
    assert (d / "dose_response.png").stat().st_size > 10_000
    fits = pd.read_csv(d / "fits.csv")
    assert set(fits.role) == {"harmful", "benign"} and (fits.slope > 0).all(), fits.to_string()
    summ = pd.read_csv(d / "summary.csv")
    h = summ[summ.role == "harmful"].set_index("alpha").refusal_rate
    assert h[0.6] > h[-0.3], h
    ti = json.loads((d / "run.json").read_text())["results"]["therapeutic_index"]
    assert "ti" in ti and "window" in ti
    assert np.isfinite(summ.coherence).all()
