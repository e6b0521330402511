"""The ``moa`` command (filled in by cli subcommands)."""
