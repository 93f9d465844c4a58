"""The ``refusal`` command line: one module per subcommand, each a thin protocol over :mod:`toolkit`."""
