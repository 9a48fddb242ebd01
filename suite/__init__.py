"""Shared machinery behind run.py: config resolvers, hardware resolution, schedules, run dirs."""
