"""Active labelling: which images to label next (strategies, suggest), merging returned labels
(importer), the budget experiment (experiment) and new categories (new_class)."""
