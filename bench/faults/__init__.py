"""Fault injection: does Tally keep its numbers right when things go wrong?

    .venv/bin/python -m bench.faults --events 200000

Produces usage to usage.raw as a gateway would (10% sent twice with the same event_id, 1%
malformed) while the three services run as child processes, SIGKILLs them at random
moments (each restarted) and restarts the Kafka broker once in the middle. Then it checks
that the projector's balances equal an independent recount (nothing lost, nothing counted
twice), that usage.dlq holds exactly the malformed messages, that every user's decision
equals `tally simulate`'s over the same events, and that no alert was sent twice.

The broker is a dedicated local one (tally_dev.localkafka, data in .local/kafka-faults), never
the developer's on 9092 nor the test session's on 19092.
"""

from bench.faults.chaos import Broker
from bench.faults.report import Figures, render
from bench.faults.run import Plan, run_faults

__all__ = ["Broker", "Figures", "Plan", "render", "run_faults"]
