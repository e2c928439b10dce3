"""The engine: scheduling, execution and output processing of requests."""
