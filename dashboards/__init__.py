"""Grafana dashboards and Prometheus alert/recording rules as code, and the files they generate.

Usage:
    headwatch dashboards generate          # rewrite dashboards/generated/
    headwatch dashboards check             # exit 1 when the committed files are stale
"""
