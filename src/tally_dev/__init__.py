"""Tools for a developer's machine, not for production: the local single-node Kafka
(`tally kafka`, localkafka.py, its jars from pom.xml through Maven) and the demo
(`tally run`, run.py, with the sample history of demo.py).

Shipped in the same wheel as `tally`, which never imports it: only the `tally kafka` and
`tally run` commands load it, when they run.
"""
