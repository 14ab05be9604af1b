"""Data: audiofolder datasets, music rendered offline, codec tokens and the delay pattern."""
