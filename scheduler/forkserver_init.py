"""Imported first by every forkserver of an IsolatedPool (its preload list): the forkserver dies with
the process that started it, before its long imports begin. Importing it anywhere else would arm the
same signal in that process, so nothing else imports it."""

from scheduler.isolation import die_with_parent

die_with_parent()
