"""The one run path (`runner.execute`) that the CLI, DVC and KFP share: above the stages, below the command line."""
