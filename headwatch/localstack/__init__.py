"""The local stack: a real Kafka broker, Prometheus and Alertmanager on 127.0.0.1, for tests and demos.

Usage:
    headwatch stack up      # start all three, print the bootstrap address and URLs
    headwatch stack down    # stop what `up` started

Kafka comes from Maven Central (deploy/local/pom.xml, cached under .cache/kafka/), Prometheus and
Alertmanager from the Debian packages; nothing here runs through systemd or Docker.
"""
