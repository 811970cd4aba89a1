"""Launching runs: sweeps with reports (sweep, grid, report), Cloud TPU VMs (tpu_vm) and
multi-host GPU jobs (gpu). Every command here is safe to run again: it resumes."""
