"""refusal-toolkit engine: model loading, hooks, activations, directions, interventions, scoring, runs.

The engine knows nothing of the command line; ``experiments/`` builds the ``refusal`` CLI on top of it.
"""

__version__ = "0.1.0"
