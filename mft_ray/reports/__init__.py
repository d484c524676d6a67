"""Reports: a run's results table and plot, tables across runs, and the paper's figures."""
