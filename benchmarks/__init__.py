"""Measurements behind docs/RESULTS.md, each run as `python -m benchmarks.<name>` from the repo root.

Experiment-only switches (ranking by path log-probability alone, reading with the pathway and bridge off, …) live
here, never in the serving code.
"""
