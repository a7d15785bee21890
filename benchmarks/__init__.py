"""Speed and memory benchmarks, measured as ratios side by side in one run."""
