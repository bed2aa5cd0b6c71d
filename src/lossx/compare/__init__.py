"""Comparing two runners' outputs, torch-free: tolerances, the comparator, its report and
the report's renderers. The build side's export self-check and lossx.parity both use it.
"""
