"""Tests of scheduler/: templates, builder pool isolation, runner, verification, tuner, extraction."""
