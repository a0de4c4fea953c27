"""The run directory: its record (`record`: run.json, the fitted scorer, metrics, report) and the rows it reads."""
