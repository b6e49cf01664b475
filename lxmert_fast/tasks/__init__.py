"""The fine-tuning tasks (VQA v2, GQA, NLVR2): declared once in registry.py; their models and heads
(task_models.py), metrics (metrics.py), evaluation and submission files (scoring.py)."""
