"""Command-line tools (run as files, ``python scripts/NAME.py``); a package only so that
``python -m scripts.bench.wsi`` can import the test suite's slide writer from the repository root."""
