"""Many runs: sweeps over grids and seeds, comparison tables and reports."""
