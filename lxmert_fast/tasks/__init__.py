"""The fine-tuning tasks (VQA v2, GQA, NLVR2): their models and heads, metrics and submission files."""
