"""Training: the configuration (`config`), the jitted programs (`steps`), data parallelism
(`parallel`), the loop (`trainer`), the sparsity metrics and unit states of a logged step
(`metrics`), pruning (`pruning`) and the paper's experiments (`experiments`)."""
