"""fleetprof: a distributed cluster profiler.

The packages: fleetprof.proto (wire contract), fleetprof.node_agent (BCC samplers and
symbolization), fleetprof.aggregator (gRPC ingest into DuckDB), fleetprof.query (SQL,
flame graphs, renderers), fleetprof.commands (one module per CLI subcommand).
"""
