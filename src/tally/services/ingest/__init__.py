"""The ingest service: usage.raw and POST /v1/usage -> usage.events and usage.dlq."""
