"""Plain building blocks with no SparkOps state: errors, the clock, process identity."""
