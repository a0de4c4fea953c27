"""How scores become decisions and metrics, the same for every scorer: train/val/test splits, probability
calibration and thresholds chosen on val, metrics with bootstrap intervals on test, the report and figures."""
