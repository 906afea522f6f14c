"""The ``lab`` command line: train, eval, watch, fit, bench, list, demo."""
