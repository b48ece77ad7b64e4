"""Training-side code for cxrd: dataset indexing, splits, training and export."""
