"""The test suite, laid out like the source tree: tests/<package>/test_<module>.py tests <package>/<module>.py.

A package (with one per directory below) so that test modules of the same basename in different
directories import as distinct modules (tests.kernels.test_x, tests.ops.test_x) under pytest's default
import mode, with the repo root on sys.path; helpers import by their full name (tests._bad_templates).
"""
