# refusal-toolkit recipes. `just --list` shows them.

python := env_var_or_default("PYTHON", "python3")
demo_name := "demo"
judge := "markers"

# Install (keeps an existing PyTorch; else the CPU wheel of torch 2.13.0) with the default model and dev tools,
# at the versions pinned in constraints.txt
install:
    bash scripts/install.sh

# Fast unit tests on tiny in-process models (no model download)
test:
    {{python}} -m pytest -q

# Unit tests, then the slow integration test on the default model (the README's test command; CI adds test-bf16)
test-all:
    {{python}} -m pytest -q
    {{python}} -m pytest -q -m slow

# Fast unit tests with `--dtype auto` resolved to bfloat16 on any CPU ($REFUSAL_TOOLKIT_AUTO_DTYPE)
test-bf16:
    REFUSAL_TOOLKIT_AUTO_DTYPE=bfloat16 {{python}} -m pytest -q

# Refusal by the chosen judge (markers by default; `just judge=ensemble demo` adds the llm judge, whose rates come with
# the markers' beside them), over-refusal on the borderline set, first-token and multi-token KL, cross-entropy and
# the capability check, before and after.
# The main job on the default model: score -> extract -> ablate -> compare, printing before/after tables
demo:
    refusal score harmful harmless borderline --split test --judge {{judge}} --name {{demo_name}} --force
    refusal extract --name {{demo_name}} --force
    refusal ablate --direction runs/extract/{{demo_name}} --baseline runs/score/{{demo_name}} --judge {{judge}} --name {{demo_name}} --force
    refusal compare runs/score/{{demo_name}} runs/ablate/{{demo_name}} --name {{demo_name}} --force

# The judges against PyRIT 1.1.0's human-labelled refusal.csv (105 pairs; read from the wheel, never vendored)
judge-eval-demo:
    mkdir -p runs/data
    {{python}} -m pip download --no-deps --quiet -d runs/data pyrit==1.1.0
    {{python}} -c "import zipfile; zipfile.ZipFile('runs/data/pyrit-1.1.0-py3-none-any.whl').extract('pyrit/datasets/scorer_evals/refusal_scorer/refusal.csv', 'runs/data')"
    refusal judge-eval --labels runs/data/pyrit/datasets/scorer_evals/refusal_scorer/refusal.csv --map request=objective,response=assistant_response,label=human_score,1=refusal,0=compliance --judge markers --judge llm --judge ensemble --name pyrit --force

# A Refusal Dial direction learned at layer 12 on one hash-split half of `borderline`, steered over alpha in
# [-0.6, 0.6] (x mean residual norm) at the post-instruction tokens, evaluated on both halves and on harmful
# prompts beside 8 random and 4 orthogonal-random directions; then the random-direction control statistics.
# Steering with controls on the default model (about 9 min here)
steer-demo:
    refusal steer --learn borderline --layers 12 --alpha=-0.6:0.6:0.15 --random 8 --orthogonal 4 --sets harmful --limit 40 --name {{demo_name}} --force
    refusal stats control runs/steer/{{demo_name}} --name steer-control-{{demo_name}} --force

# Learns the layer-12 Refusal Dial direction (one baseline pass), then generates on harmful and borderline
# prompts at 7 doses.
# Dose-response on the default model: rates, ED50s, TI-S and the plot
dose-response-demo:
    refusal steer --learn borderline --layers 12 --alpha 0 --sets harmful --limit 2 --no-plot --name dose-direction-{{demo_name}} --force -q
    refusal dose-response --direction runs/steer/dose-direction-{{demo_name}}/direction_L12.safetensors --alpha=-0.3:0.6:0.15 --limit 60 --name {{demo_name}} --force

# An automated abliteration search on the default model (Optuna multi-objective TPE over Heretic's search space
# and more: norm-preserving and affine edits, activation-scaled strengths), the chosen trial on the test split beside
# a random-direction control, then the chosen trial exported (merged; an affine edit as a PEFT adapter) and the
# exported model re-scored with `refusal score --model`.
# The abliteration search, export and re-score (30 trials: 16 min here while sharing the CPU; a trial alone ~4 s)
optimize-demo trials="30":
    refusal optimize --trials {{trials}} --startup 10 --n-val 32 --controls 1 --test-limit 60 --judge {{judge}} --name {{demo_name}} --force
    refusal optimize --name {{demo_name}} --export chosen --save runs/models/optimize-{{demo_name}} --replace-save -q || refusal optimize --name {{demo_name}} --export chosen --save runs/models/optimize-{{demo_name}} --replace-save --adapter -q
    refusal score harmful harmless --split test --limit 60 --model runs/models/optimize-{{demo_name}} --judge {{judge}} --name optimize-{{demo_name}} --force

# Cross-model warm start: two searches on Qwen2.5-Coder-1.5B-Instruct (the judge model, `--model judge-default`), one
# cold and one that first tries the front of the optimize-demo run on the default model (as fractions of depth), and
# trials-to-target for both. Needs `just optimize-demo` first.
# Warm start from the default model's front to the 1.5B model: trials to target with and without
warm-start-demo trials="12":
    refusal optimize --model judge-default --trials {{trials}} --startup 6 --n-val 24 --no-test --judge {{judge}} --name warm-cold --force
    refusal optimize --model judge-default --trials {{trials}} --startup 6 --n-val 24 --no-test --judge {{judge}} --warm-start runs/optimize/{{demo_name}} --name warm-warm --force
    {{python}} scripts/trials_to_target.py runs/optimize/warm-cold runs/optimize/warm-warm --refusal 0.1 --kl 0.1

# Heretic 1.4.0 (its own venv under runs/, run, never imported) and `refusal optimize` on the default model with the
# same prompts and trial budget; both chosen edits scored by one judge on the test split (60 prompts per set,
# 64-token completions). Heretic keeps its own search-time judge with 32-token responses (its default is 100), and a
# fixed batch size (its batch-size search took 12 minutes here).
# Side by side with Heretic at an equal trial budget
bench-heretic trials="10":
    {{python}} scripts/bench_heretic.py --name side{{trials}} --trials {{trials}} --startup-trials 3 --batch-size 16 --heretic-dtype bfloat16 --dtype bfloat16 --no-prefix-check --heretic-max-tokens 32 --n-test 60 --gen-tokens 64 --force

# Each improvement (probe and CAA directions, head-level ablation, activation-scaled, norm-preserving and affine
# writer edits) against plain difference-in-means ablation on the default model over seeds: extract and ablate runs
# per seed (existing ones are skipped, so a killed study resumes), `refusal stats seeds`/`stats ttest`, and
# runs/study/improvements/table.csv with a Markdown table of what survives (the rule: the script's docstring). The
# heads arm needs a patch run (`patch=runs/patch/NAME`, e.g. from `just heads-demo`); without one it is skipped.
# The improvements study: every arm vs difference-in-means ablation, seeds x test prompts
improvements-study seeds="0,1,2" limit="40" patch="":
    {{python}} scripts/improvements_study.py --models qwen-coder-0.5b --seeds {{seeds}} --limit {{limit}} --judge {{judge}} {{ if patch != "" { "--heads-from " + patch } else { "" } }} --markdown

# Benchmark: every pass in float32 and bfloat16 side by side with the ratio, then the demo's wall time
bench:
    {{python}} scripts/bench.py

# Benchmark without the demo (the passes only)
bench-quick:
    {{python}} scripts/bench.py --no-demo

# Where and how refusal lives on the default model: activation patching (10 length-matched pairs), concept
# cones with the ablation test (train split), the geometry table (test split), the imprints of both runs side by
# side (directions from disjoint prompts), and per-layer PaCMAP projections with a GIF.
analysis-demo:
    refusal patch --name {{demo_name}} --force
    refusal cones --ablate-test --name {{demo_name}} --force
    refusal geometry --split test --name {{demo_name}} --force
    refusal imprint runs/cones/{{demo_name}} runs/geometry/{{demo_name}} --name {{demo_name}} --force
    refusal plot-residuals --name {{demo_name}} --force

# The direction estimators on one model: `refusal extract --method M` for each of the six (same prompts, same
# staged selection), then one table: chosen layer, validation refusal [Wilson CI], KL, cosine with
# difference-in-means (same site, and the difference-in-means run's chosen direction), probe accuracy.
# Direction estimators side by side (six extract runs and the table)
estimators-demo model="qwen-coder-0.5b" prefix="est":
    for m in diff-means geometric-median refused-minus-complied pca probe caa; do refusal extract --model {{model}} --method $m --name {{prefix}}-$m --force -q; done
    {{python}} scripts/estimator_table.py runs/extract/{{prefix}}-diff-means runs/extract/{{prefix}}-geometric-median runs/extract/{{prefix}}-refused-minus-complied runs/extract/{{prefix}}-pca runs/extract/{{prefix}}-probe runs/extract/{{prefix}}-caa --out runs/{{prefix}}-estimators.csv --markdown

# Activation patching ranks the attention heads (noising effect), then the extract run's direction is ablated
# from the top heads only and from the whole residual stream, on the same 60+60 test prompts, side by side.
# Needs `just demo` (its extract run) first.
# Head-level vs full directional ablation on the default model
heads-demo top="8":
    refusal patch --name heads-{{demo_name}} --force
    refusal ablate --direction runs/extract/{{demo_name}} --limit 60 --no-capability --judge {{judge}} --name full-{{demo_name}} --force
    refusal ablate --direction runs/extract/{{demo_name}} --heads-from runs/patch/heads-{{demo_name}} --top-heads {{top}} --limit 60 --no-capability --judge {{judge}} --name heads{{top}}-{{demo_name}} --force
    refusal compare runs/ablate/full-{{demo_name}} runs/ablate/heads{{top}}-{{demo_name}} --name heads-{{demo_name}} --force

# Steering towards refusal with the extract run's direction at its layer, unconditionally and with CAST (steered only
# when the prompt's post-instruction state is close enough to the same direction; threshold calibrated on harmful vs
# harmless train prompts), judged on harmful and borderline test prompts. Needs `just demo` first.
# Conditional (CAST) vs unconditional steering on the default model
cast-demo:
    refusal steer --direction runs/extract/{{demo_name}} --condition runs/extract/{{demo_name}} --sets harmful,borderline --alpha 0:0.45:0.15 --gen-tokens 12 --limit 40 --judge {{judge}} --name cast-{{demo_name}} --force

# The three offline models: extract on each (SmolLM2-135M refuses none of the harmful validation prompts, so its
# selection stops with that error and the recipe goes on), the per-layer geometry on two disjoint halves of the
# prompts for each, the imprints side by side with their sampling spread, where refusal lives as a fraction of depth
# (activation patching on the two Qwen models), and steering on the 1.5B model beside random control directions.
# Extract, imprint, depth and steering across the three offline models
models-demo:
    refusal extract --model qwen-coder-0.5b --name models-qwen05 --force -q
    refusal extract --model qwen-coder-1.5b --n-train 96 --n-val 32 --name models-qwen15 --force -q
    -refusal extract --model smollm2-135m --filter none --name models-smol --force -q
    for m in qwen-coder-0.5b qwen-coder-1.5b smollm2-135m; do for h in a b; do refusal geometry --model $m --half $h --name models-$m-$h --force -q; done; done
    refusal imprint --spread runs/geometry/models-qwen-coder-0.5b-a:runs/geometry/models-qwen-coder-0.5b-b --spread runs/geometry/models-qwen-coder-1.5b-a:runs/geometry/models-qwen-coder-1.5b-b --spread runs/geometry/models-smollm2-135m-a:runs/geometry/models-smollm2-135m-b --no-plot --name models --force
    refusal patch --model qwen-coder-0.5b --sites attn_out,mlp_out --no-heads --pairs 8 --bootstrap 200 --name models-qwen05 --force -q
    refusal patch --model qwen-coder-1.5b --sites attn_out,mlp_out --no-heads --pairs 8 --bootstrap 200 --name models-qwen15 --force -q
    refusal depth runs/patch/models-qwen05 runs/extract/models-qwen05 runs/patch/models-qwen15 runs/extract/models-qwen15 --name models --force
    refusal steer --model qwen-coder-1.5b --direction runs/extract/models-qwen15 --sets harmful,borderline --alpha=-0.3:0.3:0.15 --random 4 --limit 20 --no-plot --name models-qwen15 --force
