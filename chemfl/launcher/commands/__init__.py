"""The `chemfl launch` subcommands, one module each with its `run(args)`; chemfl.launcher.cli imports
a module only when its subcommand runs."""
