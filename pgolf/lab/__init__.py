"""Lab: the ledger, experiments, sweeps, statistics, plots, planning and submissions."""
