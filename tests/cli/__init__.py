"""Tests of shapetune/cli/: the tune and db commands."""
