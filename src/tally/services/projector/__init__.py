"""The projector: folds usage.events into DuckDB, publishes budget.balances; replay; audit."""
