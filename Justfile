# refusal-toolkit recipes. `just --list` shows them.

python := env_var_or_default("PYTHON", "python3")
demo_name := "demo"

# Install (keeps an existing PyTorch; else the CPU wheel of torch 2.13.0) with the default model and dev tools
install:
    bash scripts/install.sh

# Fast unit tests on tiny in-process models (no model download)
test:
    {{python}} -m pytest -q

# Unit tests, then the slow integration test on the default model (what CI runs)
test-all:
    {{python}} -m pytest -q
    {{python}} -m pytest -q -m slow

# The main job on the default model: score -> extract -> ablate -> compare, printing a before/after table
demo:
    refusal score harmful harmless --split test --name {{demo_name}} --force
    refusal extract --name {{demo_name}} --force
    refusal ablate --direction runs/extract/{{demo_name}} --baseline runs/score/{{demo_name}} --name {{demo_name}} --force
    refusal compare runs/score/{{demo_name}} runs/extract/{{demo_name}} runs/ablate/{{demo_name}} --name {{demo_name}} --force

# Benchmark: activation-collection throughput (prompt tokens/s) and the demo's wall time
bench:
    {{python}} scripts/bench.py

# Benchmark without the demo (throughput only)
bench-quick:
    {{python}} scripts/bench.py --no-demo
