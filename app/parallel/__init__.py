"""Parallel training: the layout rules, the one step engine, pipeline schedules, their
interpreter and the pipeline partition (see the README's layout section)."""
