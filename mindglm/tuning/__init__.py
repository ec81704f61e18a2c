"""Fine-tuning: datasets -> ids/labels per family (data.py), the train step and optimizer
(train.py), generation metrics (metrics.py)."""
