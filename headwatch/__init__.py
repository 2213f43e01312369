"""headwatch: the command line and the applications built on the collector and the exporter."""
