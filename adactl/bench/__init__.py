"""Side-by-side benchmarks (`adactl bench ...`): one process, same prompts and seed, ratios."""
