"""Op-family tests (shapetune/ops/<family>.py through tuning to kernels/<family>.py), CPU and GPU."""
