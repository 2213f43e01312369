"""headwatch exporter: Kafka head statistics in, patterns, drift and compression verdicts out as Prometheus metrics.

Usage:
    headwatch exporter serve       # or: python -m exporter
    headwatch exporter rebaseline --model NAME

Importing the package does nothing: no sockets, no environment reads, and never torch.
"""
