"""engine-sweep: a grid of steering settings over prompt sets and models, resumable, with its report."""
