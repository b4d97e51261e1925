"""Load tests for streamgate: `python -m loadtests --help`."""
