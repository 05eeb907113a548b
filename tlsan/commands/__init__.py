"""One module per `tlsan` subcommand; see `tlsan.cli`."""
