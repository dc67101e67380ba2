"""One loader for auth.yaml, users.yaml and budgets.yaml."""
