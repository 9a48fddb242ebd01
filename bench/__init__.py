"""`make bench`: every task's training throughput through run.py beside a plain PyTorch loop."""
