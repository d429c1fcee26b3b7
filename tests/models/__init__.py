"""Tests of the model layer (config, MegalodonLM, StreamState).

A package so that its test module names (test_streaming, test_errors, ...) cannot collide with
same-named modules in other test folders under pytest's default import mode.
"""
