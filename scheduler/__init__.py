"""Scheduling: workload extraction from models and tuning schedule templates."""
