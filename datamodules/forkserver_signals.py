"""Imported by the loader workers' forkserver when it starts (datamodules.base._worker_start_method).

A scheduler stops a job by signalling all its processes (SLURM: SIGTERM, or SIGUSR1 before a requeue). The main
process handles the signal and stops cleanly after its batch; the forkserver, left to the default, would die,
and its loader workers, whose parent it is, would exit with it: a clean stop would end in a DataLoader error.
The server ends on its own when the main process exits (its socket closes).
"""
import signal

for _name in ("SIGTERM", "SIGUSR1"):
    signal.signal(getattr(signal, _name), signal.SIG_IGN)
