"""The run directory: its layout, debate records, atomic files, stage status and the driver's preflight checks."""
