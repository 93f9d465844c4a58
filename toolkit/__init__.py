"""refusal-toolkit engine: model loading, hooks, activations, directions, interventions, scoring, runs.

The engine knows nothing of the command line; ``experiments/`` builds the ``refusal`` CLI on top of it. Its errors
(:class:`toolkit.errors.ToolkitError`) name engine parameters, which the CLI maps to flags; layer and position
selections are parsed and resolved by :mod:`toolkit.index_spec`, directions travel as
:class:`toolkit.directions.Direction` / :class:`~toolkit.directions.DirectionSet`.
"""

__version__ = "0.1.0"
