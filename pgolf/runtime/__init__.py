"""Runtime: devices, processes, attention kernels, compile checks."""
