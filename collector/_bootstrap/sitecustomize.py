"""Loaded by Python at start-up when `headwatch run` puts this folder on PYTHONPATH.

It only registers an import hook (cheap, no torch): the collector attaches itself when the
program loads a transformers model. Another sitecustomize further down the path still runs.
"""

from collector.auto import chain_sitecustomize, install_import_hook

install_import_hook()
chain_sitecustomize(__file__)
