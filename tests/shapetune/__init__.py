"""Tests of shapetune/: workloads, targets, buckets, the tuning DB (store, codec) and import trust."""
