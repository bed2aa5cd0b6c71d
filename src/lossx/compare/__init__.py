"""Comparing two runners' outputs, torch-free: tolerances, the parity engine, its report and
the report's renderers. The build side's export self-check and lossx.parity both use it.
"""
