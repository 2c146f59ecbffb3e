"""marginops benchmark suite: ``python -m bench --help``."""
