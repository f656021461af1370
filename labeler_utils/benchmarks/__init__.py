"""Human-graded benchmarks: loaders for every format (``loaders``), query folds (``folds``), predictions files."""
