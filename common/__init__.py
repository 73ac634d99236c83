"""The contract both halves of the federation share: the run configuration, aggregation sums, client-level
DP mechanisms, message records and the SecAgg+ primitives. Imported by `fedpa.client` and `fedpa.server`;
imports neither."""
