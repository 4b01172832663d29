"""Small shared utilities of the applications (never of the loss library): files (fs.py), the one UsageError
(errors.py), a free local port (net.py), and the CPU compatibility layer for megatron-core (cpu_mode.py, used by
the Megatron engine and by conversion's logit verification)."""
