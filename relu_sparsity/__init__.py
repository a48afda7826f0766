"""relu-sparsity: fused-instrumentation ReLU MLP kernels and the training stack around them."""

__version__ = "0.1.0"
