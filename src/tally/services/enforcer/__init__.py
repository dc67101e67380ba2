"""The enforcer: balances in, decisions and alerts out, through the pure policy; the
budgets API, the live dashboard and alert delivery beside it."""
