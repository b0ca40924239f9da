"""Tests of the gateway; `tests/utils.py` starts real servers on free ports."""
