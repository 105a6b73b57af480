"""`python -m jllm ...` is the `jllm` command."""
import sys

from jllm.cli import main

sys.exit(main())
