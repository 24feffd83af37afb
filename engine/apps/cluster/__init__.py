"""engine-ray: one job over every GPU of a Ray cluster, in parts that resume and merge."""
