"""`python -m gateway.fake_llm ARGS...`, the same as `python -m gateway fake-llm ARGS...`."""

import sys

from .cli import main

sys.exit(main(sys.argv[1:]))
