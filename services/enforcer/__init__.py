"""The enforcer: balances in, decisions and alerts out, through the pure policy."""
