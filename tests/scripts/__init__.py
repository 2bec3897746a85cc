"""Tests of scripts/: benchmark scripts and BENCHMARKS.md rendering."""
