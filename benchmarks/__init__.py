"""corral's benchmark, outside the package: it drives corral through its public API, as a user would.

`make bench` runs it (`python -m benchmarks`); `run.py` lists the rows and prints the table.
"""
