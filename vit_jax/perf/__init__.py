"""Speed and memory measurement: benchmark rows, the table, the input pipeline, GPU parity."""
