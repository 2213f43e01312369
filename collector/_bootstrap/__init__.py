"""The folder `headwatch run` puts first on PYTHONPATH; Python imports its sitecustomize at start-up."""
