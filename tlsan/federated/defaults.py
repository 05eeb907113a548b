"""The defaults of `tlsan federate` (a module of its own so that the CLI reads them without
importing torch). README, "Federated fine-tuning", gives the validation figures behind them."""

DEFAULT_ROUNDS = 50
DEFAULT_CLIENT_UNIT = "cohort:100"
DEFAULT_EVAL_FRACTION = 1.0
