"""Tests of cost_model/: features, the XGBoost ranker and its evaluation."""
