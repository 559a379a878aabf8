"""Scoring: calibration data in, importance scores out (criteria for heads, neurons and whole blocks)."""
