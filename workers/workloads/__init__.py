"""Built-in workloads: no downloads (data shipped with scikit-learn, or generated)."""
