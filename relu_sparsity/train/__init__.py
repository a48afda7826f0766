"""Data, the training loop, sparsity metrics over time, and the paper's reports."""
