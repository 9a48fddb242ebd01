"""Callbacks that add what Lightning lacks; each task's metric callbacks live here too."""
