"""Using a trained model: the Predictor (predictor.py), scoring a model folder on annotation files (evaluation.py)
and its attention maps (attention.py). The commands are lxmert_fast/predict.py, evaluate.py and visualize.py."""
