"""Scaling laws on your own hardware: sweep a grid of model sizes x compute budgets, fit, predict, plot."""
